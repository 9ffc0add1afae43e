"""A minimal Debian arm64 root file system for the emulated Python, built without emulation and cached.

``mmdebstrap --variant=extract`` downloads the listed packages and their dependencies for arm64 and only
unpacks them: no maintainer script runs, so nothing is emulated and it takes seconds. What it gives is
exactly what the agent needs from the OS: Python 3 (interpreter and standard library), glibc and libstdc++.
Debian bookworm, the base of Raspberry Pi OS: Python 3.11, glibc 2.36.

mmdebstrap writes a tarball that this user unpacks, so the tree belongs to whoever runs arm-check, root
or not (as a normal user mmdebstrap works in its ``unshare`` mode, where a directory output would belong
to a sub-uid). The tree is unpacked into ``<cache>/rootfs-<suite>-<key>.partial`` and renamed into place
when complete, so an interrupted build is redone, never used; ``<key>`` hashes the recipe, so changing it
builds anew (and removes the old tree). The
standard library is byte-compiled on the host (when the host Python has the same minor version) because
unpacking skips Debian's py3compile and the guest runs with ``-B``: compiling it on every emulated start
would cost seconds.

Each emulated CPU gets a *view* of the tree, ``<cache>/views/<rootfs>/<cpu>/``: symlinks to the rootfs's
top-level folders plus its own ``proc/cpuinfo`` (see cpus.py), so CPUs run side by side with the right
cpuinfo each, and the shared tree is never written to.
"""

from __future__ import annotations

import compileall
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from armcheck import ArmCheckError, cpus

log = logging.getLogger(__name__)

SUITE = "bookworm"
PYTHON_VERSION = "3.11"
PACKAGES = (f"python{PYTHON_VERSION}-minimal", f"libpython{PYTHON_VERSION}-stdlib", "libstdc++6")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
RECIPE_VERSION = 3  # bump when the build steps below change
COMPLETE = ".armcheck-complete"
# proc: each view has its own; dev, tmp: the guest gets the host's (qemu falls back to the host's path)
NOT_IN_VIEWS = frozenset({"proc", "dev", "tmp", COMPLETE})


@dataclass(frozen=True)
class Rootfs:
    """A complete arm64 tree: where it is, its Python's minor version and its glibc version."""

    root: Path
    python_version: str
    glibc: tuple[int, int]

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / f"python{self.python_version}"


@dataclass(frozen=True)
class CpuView:
    """The root qemu gets for one CPU model: the shared tree plus that CPU's /proc/cpuinfo."""

    cpu: str
    root: Path
    features: list[str]

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / f"python{PYTHON_VERSION}"


def mirror() -> str:
    return os.environ.get("EDGEPACK_ARM_MIRROR", DEFAULT_MIRROR)


def ensure_rootfs(cache: Path) -> Rootfs:
    """The cached tree for the current recipe, built first when missing (needs mmdebstrap and the network)."""
    recipe = {"suite": SUITE, "packages": PACKAGES, "mirror": mirror(), "version": RECIPE_VERSION}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    root = cache / f"rootfs-{SUITE}-{key}"
    if not (root / COMPLETE).is_file():
        _build(root, recipe)
        for stale in [*cache.glob("rootfs-*"), *cache.glob("views/rootfs-*")]:
            if stale.name != root.name:
                log.info("removing %s (an older recipe)", stale)
                shutil.rmtree(stale, ignore_errors=True)
    return Rootfs(root, PYTHON_VERSION, _glibc_version(root))


def cpu_view(rootfs: Rootfs, cache: Path, cpu_name: str, emulator: cpus.Emulator) -> CpuView:
    """The per-CPU root for ``cpu_name``, with its cpuinfo written for this host's CPU count."""
    cpu = cpus.model(cpu_name)
    view = cache / "views" / rootfs.root.name / cpu_name
    (view / "proc").mkdir(parents=True, exist_ok=True)
    for entry in rootfs.root.iterdir():
        link = view / entry.name
        if entry.name in NOT_IN_VIEWS or link.is_symlink():
            continue
        link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    features = _features(view, cpu_name, emulator)
    text = cpus.cpuinfo_text(cpu, features, cpus.host_processors())
    cpuinfo = view / "proc" / "cpuinfo"
    if not cpuinfo.is_file() or cpuinfo.read_text() != text:
        tmp = cpuinfo.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(cpuinfo)
    return CpuView(cpu_name, view, features)


def _features(view: Path, cpu_name: str, emulator: cpus.Emulator) -> list[str]:
    """The CPU's hwcaps under this qemu, probed once and remembered in the view."""
    remembered = view / "features.json"
    if remembered.is_file():
        saved = json.loads(remembered.read_text())
        if saved.get("qemu") == emulator.version:
            return list(saved["features"])
    features = cpus.probe_features(emulator, cpu_name, view, view / "usr" / "bin" / f"python{PYTHON_VERSION}")
    remembered.write_text(json.dumps({"qemu": emulator.version, "features": features}))
    return features


def _build(root: Path, recipe: dict[str, object]) -> None:
    tool = shutil.which("mmdebstrap")
    if tool is None:
        raise ArmCheckError(
            "mmdebstrap is not installed: apt-get install mmdebstrap (it builds the arm64 root file system "
            "without emulation; needed once, the result is cached)"
        )
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tarball = root.with_name(root.name + ".tar")
    argv = [
        tool,
        "--variant=extract",
        "--arch=arm64",
        f"--include={','.join(PACKAGES)}",
        "--format=tar",  # unpacked below by this user: a tree this user owns, whichever mode mmdebstrap used
        "--skip=output/dev",  # no device nodes: the guest uses the host's /dev
        SUITE,
        str(tarball),
        mirror(),
    ]
    log.info("building the arm64 root file system (%s, %s) with mmdebstrap: once, then cached", SUITE, mirror())
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ArmCheckError(
                f"mmdebstrap failed (exit {done.returncode}); check that {mirror()} is reachable "
                f"(set EDGEPACK_ARM_MIRROR for another mirror):\n{done.stderr.strip()[-2000:]}"
            )
        partial.mkdir()
        untar = subprocess.run(
            ["tar", "-xf", str(tarball), "-C", str(partial), "--no-same-owner"],
            capture_output=True,
            text=True,
            check=False,
        )
        if untar.returncode != 0:
            raise ArmCheckError(f"cannot unpack {tarball}: {untar.stderr.strip()[-1000:]}")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        tarball.unlink(missing_ok=True)
    python = partial / "usr" / "bin" / f"python{PYTHON_VERSION}"
    if not python.is_file():
        raise ArmCheckError(f"mmdebstrap finished but {python} is missing; the package list {PACKAGES} is wrong")
    _precompile(partial)
    (partial / COMPLETE).write_text(json.dumps(recipe, sort_keys=True))
    partial.rename(root)
    log.info("arm64 root file system ready in %.1f s: %s", time.monotonic() - started, root)


def _precompile(root: Path) -> None:
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    if host != PYTHON_VERSION:
        log.warning(
            "host Python %s differs from the rootfs's %s: the standard library stays uncompiled and every "
            "emulated start compiles what it imports (slower, still correct)",
            host,
            PYTHON_VERSION,
        )
        return
    stdlib = root / "usr" / "lib" / f"python{PYTHON_VERSION}"
    # stripdir/prependdir: the .pyc files name the paths the guest sees (/usr/lib/...), not the host's
    compileall.compile_dir(stdlib, quiet=2, workers=0, stripdir=str(root), prependdir="/")


def _glibc_version(root: Path) -> tuple[int, int]:
    for libc in (root / "lib" / "aarch64-linux-gnu" / "libc.so.6", root / "usr/lib/aarch64-linux-gnu/libc.so.6"):
        if libc.is_file():
            match = re.search(rb"release version (\d+)\.(\d+)", libc.read_bytes())
            if match:
                return int(match.group(1)), int(match.group(2))
    raise ArmCheckError(f"cannot find glibc's version in {root}; delete that folder to rebuild it")
