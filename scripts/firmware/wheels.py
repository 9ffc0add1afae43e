"""The Python packages of a device image: the edgepack wheel of this tree and its dependencies as binary wheels.

The edgepack wheel is built the way ``scripts/arm-check`` builds it (:func:`armcheck.wheels._build_wheel`:
setuptools' PEP 517 hook on a copy of the package folders, so the shared tree's ``build/`` is never
touched), into the build's work folder: a fresh one per image, never mixed with an older build of the same
version. The dependencies of ``REQUIREMENT`` (``edgepack[agent-onnx]`` …) come from
``pip download --only-binary=:all: --platform … --python-version …`` for the class's architecture and its
Debian suite's Python: only wheels, so the image needs no compiler. They are cached in
``<cache>/wheels/<arch>-cp<ver>/``; a build first resolves offline against that folder and goes to PyPI
only when something is missing (a changed requirement, a new dependency).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from armcheck.wheels import _build_wheel  # one way to build the wheel, shared with arm-check

from firmware import FirmwareError, proc
from firmware.classes import ARCHES, REPO, DeviceClass

log = logging.getLogger(__name__)

# Debian suite -> (its Python, its glibc minor version: the newest manylinux_2_N tag its wheels may use)
SUITES = {"bookworm": ("3.11", 36), "trixie": ("3.13", 41)}
_SAVED = re.compile(r"^(?:Saved|File was already downloaded) (.+\.whl)$")


@dataclass(frozen=True)
class WheelSet:
    """The wheels one image installs: this tree's edgepack wheel and the resolved dependencies (with pip)."""

    edgepack: Path
    dependencies: list[Path]

    @property
    def files(self) -> list[Path]:
        return [self.edgepack, *self.dependencies]


def python_of(klass: DeviceClass) -> str:
    if klass.suite not in SUITES:
        raise FirmwareError(f"{klass.name}: Debian suite {klass.suite!r} is not one of {', '.join(SUITES)}")
    return SUITES[klass.suite][0]


def platform_args(klass: DeviceClass) -> list[str]:
    """pip's target options: CPython of the suite, manylinux tags up to the suite's glibc, this machine."""
    version, glibc_minor = SUITES[klass.suite]
    machine = ARCHES[klass.arch][2]
    tags = ["manylinux2014_" + machine, *(f"manylinux_2_{m}_{machine}" for m in range(17, glibc_minor + 1))]
    abi = "cp" + version.replace(".", "")
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", version]
    for tag in tags:
        args += ["--platform", tag]
    for name in (abi, "abi3", "none"):
        args += ["--abi", name]
    return args


def build_edgepack_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgepack-wheel-") as tmp:
        try:
            built = _build_wheel(REPO, Path(tmp))
        except Exception as exc:  # armcheck raises its own error type; name the step for this tool
            raise FirmwareError(f"building the edgepack wheel failed: {exc}") from exc
        target = dest / built.name
        shutil.copy2(built, target)
    return target


def ensure_wheels(cache: Path, klass: DeviceClass, work: Path, python: str, on_line: proc.LineHook) -> WheelSet:
    """Build the edgepack wheel into ``work`` and resolve its dependencies (cache first, then PyPI)."""
    edgepack = build_edgepack_wheel(work / "edgepack-wheel")
    folder = cache / "wheels" / f"{klass.arch}-cp{python_of(klass).replace('.', '')}"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = [f"{edgepack}{_extras(klass.requirement)}", *_other_requirements(klass.requirement), "pip"]
    common = [python, "-m", "pip", "download", "--disable-pip-version-check", "--dest", str(folder)]
    common += platform_args(klass)
    try:
        lines = proc.run(
            [*common, "--no-index", "--find-links", str(folder), *wanted],
            what="resolving the wheels from the cache",
            on_line=on_line,
        )
        log.info("every wheel for %s came from the cache %s", klass.name, folder)
    except FirmwareError:
        log.info("some wheels for %s are not cached yet: downloading them from PyPI", klass.name)
        lines = proc.run(
            [*common, *wanted],
            what=f"downloading binary wheels for {klass.requirement} ({klass.arch}, Python {python_of(klass)}) "
            "from PyPI (is every dependency published as a wheel for this platform?)",
            on_line=on_line,
        )
    files = []
    for line in lines:
        match = _SAVED.match(line.strip())
        if match:
            path = Path(match.group(1))
            if not path.is_absolute():
                path = folder / path.name
            if path.name.startswith("edgepack-"):
                path.unlink(missing_ok=True)  # pip copies the requested wheel too; it belongs to this build only
                continue
            files.append(path)
    if not files:
        raise FirmwareError(f"pip download listed no wheel for {klass.requirement}; see the build log")
    return WheelSet(edgepack, sorted(set(files)))


def _extras(requirement: str) -> str:
    """``[agent-onnx]`` of the requirement's edgepack entry."""
    for word in requirement.split():
        if word.startswith("edgepack"):
            return word[len("edgepack") :]
    raise FirmwareError(f"REQUIREMENT={requirement!r} does not name edgepack (e.g. edgepack[agent-onnx])")


def _other_requirements(requirement: str) -> list[str]:
    return [word for word in requirement.split() if not word.startswith("edgepack")]
