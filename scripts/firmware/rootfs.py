"""The device's root file system: a cached Debian base from mmdebstrap, the agent installed in it under chroot.

``mmdebstrap --variant=essential`` makes the smallest Debian that boots: the Essential packages plus the
class's ``DEBIAN_PACKAGES`` (python3, systemd, ca-certificates …), no apt, no compiler, with man pages,
docs (copyright files kept) and translations left out by dpkg path filters. It runs in mmdebstrap's root
mode (this builder runs as root: it chroots), so maintainer scripts run and the tree holds real owners;
for arm64 they run through qemu-user-static's binfmt_misc handler (registered here when missing). The
result is cached as ``<cache>/base/<suite>-<arch>-<key>.tar``, ``<key>`` hashing the recipe and mirror,
written as ``.partial`` and renamed when complete.

Per image the tarball is unpacked into the work folder, the build context is copied to
``/tmp/edgepack-build`` inside it, ``install-agent.sh`` runs there under ``chroot`` (no network: the wheels
are local), the context is removed, and the tree is packed as the image's single layer (owners numeric,
names sorted; ``/dev``, ``/proc``, ``/sys``, ``/run`` and ``/tmp`` left empty: the device mounts them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
from pathlib import Path

from firmware import FirmwareError, proc
from firmware.classes import DeviceClass

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when the mmdebstrap options below change
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DPKG_EXCLUDE = (
    "/usr/share/man/*",
    "/usr/share/doc/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
    "/usr/share/bash-completion/*",
)
DPKG_INCLUDE = ("/usr/share/doc/*/copyright", "/usr/share/locale/locale.alias")
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
QEMU = {"arm64": "aarch64", "amd64": "x86_64"}
EMPTY_DIRS = ("dev", "proc", "sys", "run", "tmp")
CONTEXT_IN_ROOT = "tmp/edgepack-build"


def mirror() -> str:
    return os.environ.get("EDGEPACK_DEBIAN_MIRROR", DEFAULT_MIRROR)


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        raise FirmwareError(f"{why} needs root (mmdebstrap's root mode and chroot); run scripts/build-image as root")


def ensure_base(cache: Path, klass: DeviceClass, on_line: proc.LineHook) -> Path:
    """The cached Debian base tarball for the class's suite, architecture and packages; built when missing."""
    recipe = {
        "suite": klass.suite,
        "arch": klass.arch,
        "packages": sorted(klass.packages),
        "mirror": mirror(),
        "version": RECIPE_VERSION,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    tarball = cache / "base" / f"{klass.suite}-{klass.arch}-{key}.tar"
    if tarball.is_file():
        log.info("Debian base from the cache: %s", tarball)
        return tarball
    require_root("building the Debian root file system")
    if shutil.which("mmdebstrap") is None:
        raise FirmwareError("mmdebstrap is not installed: apt-get install mmdebstrap (it builds the Debian base)")
    ensure_emulation(klass.arch)
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial")
    argv = ["mmdebstrap", "--mode=root", "--variant=essential", f"--arch={klass.arch}"]
    if klass.packages:
        argv.append(f"--include={','.join(klass.packages)}")
    argv += [f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDE]
    argv += [f"--dpkgopt=path-include={p}" for p in DPKG_INCLUDE]
    argv += ["--format=tar", klass.suite, str(partial), mirror()]
    try:
        proc.run(
            argv,
            what=f"mmdebstrap ({klass.suite} {klass.arch} from {mirror()}; set EDGEPACK_DEBIAN_MIRROR for another)",
            on_line=on_line,
        )
        partial.rename(tarball)
    finally:
        partial.unlink(missing_ok=True)
    for stale in tarball.parent.glob(f"{klass.suite}-{klass.arch}-*.tar"):
        if stale != tarball:
            log.info("removing %s (an older recipe)", stale)
            stale.unlink()
    return tarball


def ensure_emulation(arch: str) -> None:
    """Foreign architectures run through qemu-user-static's binfmt_misc handler; register it when missing."""
    host = HOST_ARCH.get(platform.machine())
    if arch == host:
        return
    name = QEMU[arch]
    if shutil.which("arch-test") is None:
        raise FirmwareError(f"mmdebstrap needs arch-test to build {arch} on {host}: apt-get install arch-test")
    handler = Path("/proc/sys/fs/binfmt_misc") / f"qemu-{name}"
    if handler.is_file():
        return
    conf = Path("/usr/lib/binfmt.d") / f"qemu-{name}.conf"
    if not conf.is_file():
        raise FirmwareError(
            f"building {arch} on {host} runs {arch} programs under emulation: apt-get install qemu-user-static arch-test"
        )
    register = Path("/proc/sys/fs/binfmt_misc/register")
    if not register.exists():
        proc.run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"], what="mounting binfmt_misc")
    line = next(ln for ln in conf.read_text().splitlines() if ln.startswith(":"))
    try:
        register.write_text(line)
    except OSError as exc:
        raise FirmwareError(
            f"cannot register qemu-{name} with binfmt_misc ({exc.strerror}); run 'systemctl restart systemd-binfmt' "
            "or 'update-binfmts --enable' on this host"
        ) from exc
    log.info("registered qemu-%s with binfmt_misc (%s)", name, conf)


def build_root(base: Path, context: Path, work: Path, on_line: proc.LineHook) -> Path:
    """Unpack ``base`` into ``work/rootfs`` and run the context's install-agent.sh there under chroot."""
    require_root("installing the agent under chroot")
    root = work / "rootfs"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    proc.run(["tar", "-xf", base, "-C", root, "--numeric-owner"], what=f"unpacking {base.name}")
    inside = root / CONTEXT_IN_ROOT
    shutil.copytree(context, inside, copy_function=_link_or_copy)
    try:
        proc.run(
            ["chroot", root, "/bin/sh", f"/{CONTEXT_IN_ROOT}/install-agent.sh", f"/{CONTEXT_IN_ROOT}"],
            what="install-agent.sh in the root file system (chroot)",
            on_line=on_line,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"},
        )
    finally:
        shutil.rmtree(inside, ignore_errors=True)
    return root


def pack_layer(root: Path, layer: Path, on_line: proc.LineHook) -> Path:
    """The tree as one tar layer: numeric owners, sorted names, the runtime-mounted folders empty."""
    excludes = [f"--exclude=./{name}/*" for name in EMPTY_DIRS]
    proc.run(
        ["tar", "--numeric-owner", "--sort=name", "--xattrs", *excludes, "-C", root, "-cf", layer, "."],
        what="packing the root file system",
        on_line=on_line,
    )
    return layer


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
