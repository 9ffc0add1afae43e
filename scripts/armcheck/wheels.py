"""The aarch64 Python packages the emulated agent runs with, installed on the host without emulation.

Two site folders go on the guest's ``sys.path``:

* ``<cache>/edgepack-<digest>/``: the edgepack wheel built from this tree (setuptools' PEP 517 hook on a
  copy of the package folders, so a build never touches the working tree's ``build/``) and unpacked,
  keyed by a digest of the sources: rebuilt only when they change (a second or two); the newest few kept.
* ``<cache>/site-<key>/``: every dependency of ``edgepack[agent-litert]`` (the agent plus LiteRT, what a
  device installs), each pinned to the version installed on this host, as aarch64 wheels.
* ``<cache>/wheels/``: the downloaded wheels; after an install only the current pins' wheels stay (a
  host upgrade would otherwise leave every older version behind).

The wheels come from ``pip download --only-binary=:all: --platform … --python-version 3.11
--implementation cp``. The platform tags run from ``manylinux2014``/``manylinux_2_17`` up to the root file
system's glibc: current numpy, ml_dtypes and ai-edge-litert wheels are tagged ``manylinux_2_27``/
``manylinux_2_28``, and given only ``manylinux2014`` pip would silently pick years-old versions (here the
pins make it fail instead). ``pip install --target --platform …`` then unpacks them on the host, and the
host Python byte-compiles them when its minor version is the guest's (the guest runs with ``-B`` and
would otherwise compile what it imports on every start).
"""

from __future__ import annotations

import compileall
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from armcheck import ArmCheckError

log = logging.getLogger(__name__)

DEVICE_EXTRAS = ("agent-litert",)
# pyproject.toml's [tool.setuptools.package-dir]: the folders the edgepack wheel is built from
SOURCE_DIRS = ("edgepack", "agent", "compiler", "targets", "fleet")
SOURCE_FILES = ("pyproject.toml", "README.md")
KEEP_EDGEPACK_BUILDS = 3
COMPLETE = ".armcheck-complete"
TEST_FOLDERS = re.compile(r"/tests?/")  # packages' own test suites: never imported, not worth compiling


@dataclass(frozen=True)
class Pin:
    """One dependency at the version this host has installed."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Site:
    """The folders to put on the guest's sys.path, and what they hold."""

    edgepack: Path
    dependencies: Path
    pins: list[Pin]

    @property
    def paths(self) -> list[Path]:
        return [self.edgepack, self.dependencies]


def ensure_site(cache: Path, repo: Path, python_version: str, glibc: tuple[int, int]) -> Site:
    """Build or reuse the edgepack wheel and the pinned aarch64 dependencies for this rootfs."""
    edgepack_dir, requires = _ensure_edgepack(cache, repo)
    pins = device_pins(requires, DEVICE_EXTRAS, python_version)
    tags = platform_tags(glibc)
    key = hashlib.sha256(json.dumps([[str(p) for p in pins], tags, python_version]).encode()).hexdigest()[:12]
    deps = cache / f"site-{key}"
    if not (deps / COMPLETE).is_file():
        _install_dependencies(cache, deps, pins, tags, python_version)
        for stale in cache.glob("site-*"):
            if stale != deps:
                log.info("removing %s (other versions)", stale)
                shutil.rmtree(stale, ignore_errors=True)
    return Site(edgepack_dir, deps, pins)


def platform_tags(glibc: tuple[int, int]) -> list[str]:
    """Every aarch64 manylinux tag a system with this glibc runs, oldest first."""
    major, minor = glibc
    if major != 2 or minor < 17:
        raise ArmCheckError(f"glibc {major}.{minor} is older than manylinux2014 (2.17); use a newer suite")
    return ["manylinux2014_aarch64", *(f"manylinux_2_{m}_aarch64" for m in range(17, minor + 1))]


def device_pins(requires: Iterable[str], extras: Iterable[str], python_version: str) -> list[Pin]:
    """The closure of edgepack's ``requires`` with ``extras`` on aarch64 Linux CPython, at the host's versions.

    edgepack itself is not pinned (its wheel comes from this tree); a self-reference such as
    ``edgepack[agent]`` expands the wheel's own requirements with that extra.
    """
    env = {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "platform_system": "Linux",
        "sys_platform": "linux",
        "os_name": "posix",
        "platform_machine": "aarch64",
        "platform_python_implementation": "CPython",
        "implementation_name": "cpython",
    }
    own = list(requires)
    pins: dict[str, Pin] = {}
    seen: set[tuple[str, str]] = set()
    missing: set[str] = set()
    todo = [("edgepack", extra) for extra in ("", *extras)]
    while todo:
        name, extra = todo.pop()
        key = canonicalize_name(name)
        if (key, extra) in seen:
            continue
        seen.add((key, extra))
        if key == "edgepack":
            lines = own
        else:
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                missing.add(name)
                continue
            pins[key] = Pin(dist.metadata["Name"], dist.version)
            lines = dist.requires or []
        for line in lines:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**env, "extra": extra}):
                todo += [(req.name, sub) for sub in ("", *req.extras)]
    if missing:
        raise ArmCheckError(
            f"arm-check pins the device's packages to this host's versions, but {', '.join(sorted(missing))} "
            f"is not installed here: pip install -e '.[{','.join(extras)}]' first"
        )
    return sorted(pins.values(), key=lambda p: canonicalize_name(p.name))


def _pip(*args: str, what: str) -> None:
    argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    log.debug("running %s", " ".join(argv))
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "is ignored" not in line]
        raise ArmCheckError(f"{what} failed (pip exit {done.returncode}):\n" + "\n".join(errors[-25:]))


def _platform_args(tags: list[str], python_version: str) -> list[str]:
    abi = "cp" + python_version.replace(".", "")
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python_version]
    for tag in tags:
        args += ["--platform", tag]
    for name in (abi, "abi3", "none"):
        args += ["--abi", name]
    return args


def _install_dependencies(cache: Path, deps: Path, pins: list[Pin], tags: list[str], python_version: str) -> None:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log.info("downloading %d aarch64 wheels (%s … %s) into %s", len(pins), tags[0], tags[-1], wheels)
    platform = _platform_args(tags, python_version)
    _pip(
        "download",
        "--quiet",
        "--no-deps",
        "--dest",
        str(wheels),
        *platform,
        *map(str, pins),
        what="downloading aarch64 wheels at the host's versions (is each version published for aarch64?)",
    )
    partial = deps.with_name(deps.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _pip(
        "install",
        "--quiet",
        "--no-deps",
        "--no-compile",  # compiled below on every core; pip compiles one file at a time
        "--no-index",
        "--find-links",
        str(wheels),
        "--target",
        str(partial),
        *platform,
        *map(str, pins),
        what="installing the aarch64 wheels into the guest's site folder",
    )
    if f"{sys.version_info.major}.{sys.version_info.minor}" == python_version:
        compileall.compile_dir(partial, quiet=2, workers=0, rx=TEST_FOLDERS)
    (partial / COMPLETE).write_text("\n".join(map(str, pins)) + "\n")
    partial.rename(deps)
    prune_wheels(wheels, pins)
    log.info("aarch64 dependencies ready in %.1f s: %s", time.monotonic() - started, deps)


def prune_wheels(wheels: Path, pins: Iterable[Pin]) -> list[Path]:
    """Delete the wheels in ``wheels`` that are not one of ``pins`` (other versions, dropped packages);
    returns what it deleted. Files that are not wheels are left alone."""
    wanted = {(canonicalize_name(p.name), p.version) for p in pins}
    removed = []
    for path in sorted(wheels.glob("*.whl")):
        try:
            name, version, *_ = parse_wheel_filename(path.name)
        except InvalidWheelFilename:
            continue
        if (name, str(version)) not in wanted:
            path.unlink()
            removed.append(path)
    if removed:
        log.info("removed %d wheel(s) of other versions from %s", len(removed), wheels)
    return removed


def _source_digest(repo: Path) -> str:
    digest = hashlib.sha256()
    paths = [repo / name for name in SOURCE_FILES]
    for folder in SOURCE_DIRS:
        paths += [p for p in (repo / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    for path in sorted(paths):
        if path.is_file() and path.suffix != ".pyc":
            digest.update(path.relative_to(repo).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _ensure_edgepack(cache: Path, repo: Path) -> tuple[Path, list[str]]:
    """The edgepack wheel of this tree unpacked in its own folder, and the wheel's Requires-Dist."""
    target = cache / f"edgepack-{_source_digest(repo)}"
    if not (target / COMPLETE).is_file():
        started = time.monotonic()
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix="armcheck-wheel-") as tmp:
            wheel = _build_wheel(repo, Path(tmp))
            with zipfile.ZipFile(wheel) as zf:  # a pure-Python wheel: unpacking it is installing it
                zf.extractall(partial)
                meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
                requires = Parser().parsestr(zf.read(meta_name).decode()).get_all("Requires-Dist") or []
            compileall.compile_dir(partial, quiet=2)
            (partial / "requires.json").write_text(json.dumps(requires))
            (partial / COMPLETE).write_text(wheel.name + "\n")
        partial.rename(target)
        log.info("edgepack wheel built and unpacked in %.1f s: %s", time.monotonic() - started, target)
        _prune(cache, keep=target)
    return target, json.loads((target / "requires.json").read_text())


def _build_wheel(repo: Path, tmp: Path) -> Path:
    """Build the wheel from a copy of the sources (setuptools' PEP 517 hook), never touching the tree's build/."""
    src = tmp / "src"
    for folder in SOURCE_DIRS:
        shutil.copytree(repo / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in SOURCE_FILES:
        shutil.copy2(repo / name, src / name)
    code = "import sys, setuptools.build_meta as hook; print(hook.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(tmp)], cwd=src, capture_output=True, text=True, check=False)
    wheels = list(tmp.glob("edgepack-*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise ArmCheckError(
            "building the edgepack wheel failed (setuptools must be installed on the host: pip install setuptools "
            f"wheel):\n{done.stderr.strip()[-2000:]}"
        )
    return wheels[0]


def _prune(cache: Path, keep: Path) -> None:
    builds = sorted((p for p in cache.glob("edgepack-*") if p.is_dir() and p != keep), key=lambda p: p.stat().st_mtime)
    for old in builds[: max(0, len(builds) - (KEEP_EDGEPACK_BUILDS - 1))]:
        shutil.rmtree(old, ignore_errors=True)
