"""Managed converter toolchains: pinned, isolated Python environments the compiler runs as subprocesses.

Some converters cannot share an environment with edgepack. onnx2tf (ONNX → TFLite) pins its own
TensorFlow, numpy 1.x, onnx, onnxruntime and protobuf, all older than what the compiler uses. So edgepack
keeps each such converter in a virtual environment of its own, created on first use and reused after:

    <root>/<name>-<pin hash>/          root: $EDGEPACK_TOOLCHAINS, else ~/.cache/edgepack/toolchains
        bin/python                     the environment's interpreter (same Python as edgepack's)
        toolchain.json                 written last: the spec, `pip freeze`, install time (its presence
                                       is what "installed" means; a half-made folder is never used)
        install.log                    pip's output

The pin hash covers the toolchain's name, its pinned requirements and the Python version, so changing a
pin (or the interpreter) makes a new folder beside the old one rather than mutating a working one.
Installs take a file lock, so two compiles (or a compile and ``edgepack toolchain install``) never build
the same environment at once; the marker file is written last, so a killed install is redone, not used.

Usage::

    chain = ensure_toolchain("tflite")                 # installs on first use (minutes), then instant
    result = chain.run(["-m", "onnx2tf", ...], cwd=work, log=work / "onnx2tf.log")
    chain.versions["onnx2tf"]                          # "1.29.24"
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack.errors import ToolchainError
from edgepack.fsutil import atomic_write_json

log = logging.getLogger(__name__)

ENV_ROOT = "EDGEPACK_TOOLCHAINS"
MARKER = "toolchain.json"
INSTALL_LOG = "install.log"


@dataclass(frozen=True)
class ToolchainSpec:
    """What a toolchain is: pinned requirements and the modules that must import once installed."""

    name: str
    description: str
    requirements: tuple[str, ...]
    imports: tuple[str, ...]
    # distributions whose versions callers want by name (recorded in the manifest's ``toolchain``)
    key_packages: tuple[str, ...] = ()

    @property
    def python(self) -> str:
        return f"{sys.version_info.major}.{sys.version_info.minor}"

    @property
    def pin_hash(self) -> str:
        """12 hex digits over name, requirements and Python version: the folder's identity."""
        blob = json.dumps({"name": self.name, "python": self.python, "requirements": sorted(self.requirements)})
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.pin_hash}"


# onnx2tf 1.29.24 pins its whole stack exactly (its own Requires-Dist); they are repeated here so the pin
# set is visible, hashed, and fails loudly if a future onnx2tf changed them. Installs from PyPI wheels on
# CPython 3.10-3.12 (linux x86_64 and aarch64); measured: see docs/compiler.md ("the tflite toolchain").
TFLITE = ToolchainSpec(
    name="tflite",
    description="ONNX → TFLite converter (onnx2tf on TensorFlow 2.19, numpy 1.26)",
    requirements=(
        "onnx2tf==1.29.24",
        "tensorflow==2.19.0",
        "tf-keras==2.19.0",
        "numpy==1.26.4",
        "onnx==1.19.1",
        "onnxruntime==1.23.0",
        "onnxsim==0.4.36",
        "onnxoptimizer==0.4.2",
        "onnx-graphsurgeon==0.5.8",
        "simple-onnx-processing-tools==1.1.32",
        "ai-edge-litert==2.1.0",
        "protobuf==4.25.5",
        "h5py==3.11.0",
        "ml-dtypes==0.5.1",
        "flatbuffers==25.12.19",
        "psutil==5.9.5",
        "opencv-python==4.11.0.86",
        "requests==2.32.5",
    ),
    imports=("onnx2tf", "tensorflow", "onnx", "onnxsim"),
    key_packages=("onnx2tf", "tensorflow", "tf-keras", "onnx", "onnxsim", "numpy"),
)

# tf2onnx 1.17.0 (TFLite → ONNX, its ``--tflite`` input) imports TensorFlow but does not declare it; the
# pins are the tflite toolchain's TensorFlow stack, so both environments hold the same TensorFlow.
TF2ONNX = ToolchainSpec(
    name="tf2onnx",
    description="TFLite → ONNX converter (tf2onnx on TensorFlow 2.19, numpy 1.26)",
    requirements=(
        "tf2onnx==1.17.0",
        "tensorflow==2.19.0",
        "numpy==1.26.4",
        "onnx==1.19.1",
        "protobuf==4.25.5",
        "flatbuffers==25.12.19",
        "ml-dtypes==0.5.1",
        "h5py==3.11.0",
        "requests==2.32.5",
    ),
    imports=("tf2onnx", "tensorflow", "onnx"),
    key_packages=("tf2onnx", "tensorflow", "onnx", "numpy"),
)

SPECS: dict[str, ToolchainSpec] = {TFLITE.name: TFLITE, TF2ONNX.name: TF2ONNX}


@dataclass(frozen=True)
class Toolchain:
    """An installed toolchain: where it is and what is in it."""

    spec: ToolchainSpec
    path: Path
    versions: Mapping[str, str]  # distribution name (lower case) -> version, from `pip freeze`
    install_seconds: float | None
    installed_at: str | None

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def bin_dir(self) -> Path:
        return self.path / "bin"

    @property
    def install_log(self) -> Path:
        return self.path / INSTALL_LOG

    def key_versions(self) -> dict[str, str]:
        """Versions of the spec's key packages, for the bundle manifest's ``toolchain``."""
        return {p: self.versions[p] for p in self.spec.key_packages if p in self.versions}

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment a toolchain process runs with: its bin/ first on PATH (onnx2tf runs `onnxsim`
        from PATH), no user site-packages, nothing of the caller's virtualenv."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", "")])
        env["VIRTUAL_ENV"] = str(self.path)
        env["PYTHONNOUSERSITE"] = "1"
        env.update(extra or {})
        return env

    def run(
        self,
        args: Sequence[str],
        *,
        cwd: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> ToolRun:
        """Run ``python ARGS`` in the toolchain, with stdout and stderr appended to ``log_path``."""
        command = [str(self.python), *args]
        log.info("toolchain %s: %s (cwd %s)", self.spec.name, " ".join(command), cwd)
        start = time.perf_counter()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as sink:
            sink.write(f"$ {' '.join(command)}\n".encode())
            sink.flush()
            try:
                proc = subprocess.run(
                    command,
                    cwd=cwd,
                    env=self.env(env),
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    timeout=timeout_s,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise ToolchainError(
                    f"the {self.spec.name} toolchain did not finish within {timeout_s:.0f} s; its log is {log_path}"
                ) from exc
        return ToolRun(returncode=proc.returncode, seconds=time.perf_counter() - start, log_path=log_path)


@dataclass(frozen=True)
class ToolRun:
    returncode: int
    seconds: float
    log_path: Path


@dataclass(frozen=True)
class ToolchainStatus:
    """One line of ``edgepack toolchain list``."""

    name: str
    description: str
    pin_hash: str
    path: Path
    installed: bool
    versions: dict[str, str] = field(default_factory=dict)
    install_seconds: float | None = None
    installed_at: str | None = None
    size_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "pin_hash": self.pin_hash,
            "path": str(self.path),
            "installed": self.installed,
            "versions": self.versions,
            "install_seconds": self.install_seconds,
            "installed_at": self.installed_at,
            "size_bytes": self.size_bytes,
        }


def toolchains_root() -> Path:
    """Where toolchains live: ``$EDGEPACK_TOOLCHAINS``, else ``~/.cache/edgepack/toolchains``."""
    configured = os.environ.get(ENV_ROOT)
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "edgepack" / "toolchains"


def get_spec(name: str) -> ToolchainSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ToolchainError(f"unknown toolchain {name!r}; edgepack knows: {', '.join(SPECS)}") from None


def find_toolchain(name: str, root: Path | None = None) -> Toolchain | None:
    """The installed toolchain ``name`` with the current pins, or None when it is not installed."""
    spec = get_spec(name)
    path = (root or toolchains_root()) / spec.folder_name
    marker = path / MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise ToolchainError(
            f"toolchain {name} at {path} has an unreadable {MARKER} ({exc}); "
            f"reinstall it with: edgepack toolchain install {name} --force"
        ) from exc
    if not (path / "bin" / "python").exists():
        raise ToolchainError(
            f"toolchain {name} at {path} has no bin/python (moved or half deleted?); "
            f"reinstall it with: edgepack toolchain install {name} --force"
        )
    return Toolchain(
        spec=spec,
        path=path,
        versions=dict(data.get("versions", {})),
        install_seconds=data.get("install_seconds"),
        installed_at=data.get("installed_at"),
    )


def ensure_toolchain(
    name: str, *, root: Path | None = None, on_progress: Callable[[str], None] | None = None
) -> Toolchain:
    """The toolchain ``name``, installed first if it is not there yet (the first call takes minutes)."""
    found = find_toolchain(name, root)
    if found is not None:
        return found
    return install_toolchain(name, root=root, on_progress=on_progress)


def install_toolchain(
    name: str,
    *,
    root: Path | None = None,
    force: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> Toolchain:
    """Create the toolchain's environment and install its pins (again, with ``force``).

    Needs network access to PyPI (or a configured index/wheelhouse) once; everything after is offline.
    """
    spec = get_spec(name)
    root = root or toolchains_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / spec.folder_name
    with _install_lock(root / f".{spec.folder_name}.lock"):
        existing = find_toolchain(name, root)
        if existing is not None and not force:
            return existing  # another process installed it while we waited for the lock
        _note(on_progress, f"installing toolchain {spec.folder_name} into {root} (minutes; once)")
        start = time.perf_counter()
        if final.exists():  # a forced reinstall, or what a killed install left (it has no marker)
            shutil.rmtree(final)
        try:
            _build(spec, final, on_progress)
            versions = _freeze(final)
            _probe(spec, final)
            seconds = time.perf_counter() - start
            atomic_write_json(
                final / MARKER,
                {
                    "name": spec.name,
                    "pin_hash": spec.pin_hash,
                    "python": spec.python,
                    "requirements": list(spec.requirements),
                    "versions": versions,
                    "install_seconds": round(seconds, 1),
                    "installed_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                },
            )
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
    log.info("toolchain %s installed in %.0f s at %s", spec.name, seconds, final)
    _note(on_progress, f"toolchain {spec.folder_name} installed in {seconds:.0f} s")
    found = find_toolchain(name, root)
    assert found is not None
    return found


def list_toolchains(root: Path | None = None, *, sizes: bool = True) -> list[ToolchainStatus]:
    """Every toolchain edgepack knows, installed or not."""
    root = root or toolchains_root()
    statuses = []
    for spec in SPECS.values():
        chain = find_toolchain(spec.name, root)
        path = root / spec.folder_name
        statuses.append(
            ToolchainStatus(
                name=spec.name,
                description=spec.description,
                pin_hash=spec.pin_hash,
                path=path,
                installed=chain is not None,
                versions=chain.key_versions() if chain else {},
                install_seconds=chain.install_seconds if chain else None,
                installed_at=chain.installed_at if chain else None,
                size_bytes=_tree_size(path) if chain and sizes else None,
            )
        )
    return statuses


# --- installing ----------------------------------------------------------------------------------


def _build(spec: ToolchainSpec, where: Path, on_progress: Callable[[str], None] | None) -> None:
    where.mkdir(parents=True)
    logfile = where / INSTALL_LOG
    _note(on_progress, "creating the virtual environment")
    _check_call([sys.executable, "-m", "venv", str(where)], logfile, "create the virtual environment")
    requirements = where / "requirements.txt"
    requirements.write_text("\n".join(spec.requirements) + "\n")
    _note(on_progress, f"pip install {len(spec.requirements)} pinned packages (TensorFlow alone is ~600 MB)")
    _check_call(
        [
            str(where / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "-r",
            str(requirements),
        ],
        logfile,
        "install the pinned packages",
    )


def _freeze(where: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(where / "bin" / "python"), "-m", "pip", "freeze", "--all"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise ToolchainError(f"pip freeze failed in the new toolchain at {where}: {out.stderr.strip()[-500:]}")
    versions = {}
    for line in out.stdout.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            versions[name.strip().lower().replace("_", "-")] = version.strip()
    return versions


def _probe(spec: ToolchainSpec, where: Path) -> None:
    code = "; ".join(f"import {m}" for m in spec.imports)
    out = subprocess.run(
        [str(where / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONNOUSERSITE": "1"},
    )
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-3:]
        raise ToolchainError(
            f"the {spec.name} toolchain installed but does not import ({' / '.join(tail)}); log: {where / INSTALL_LOG}"
        )


def _check_call(command: list[str], logfile: Path, what: str) -> None:
    with open(logfile, "ab") as sink:
        sink.write(f"$ {' '.join(command)}\n".encode())
        sink.flush()
        proc = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace").strip().splitlines()[-5:]
        raise ToolchainError(
            f"could not {what} for the toolchain (exit {proc.returncode}): {' / '.join(tail)}; "
            "installing needs PyPI (or a pip index/wheelhouse configured in pip.conf) once"
        )


@contextlib.contextmanager
def _install_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _note(on_progress: Callable[[str], None] | None, text: str) -> None:
    log.info(text)
    if on_progress is not None:
        on_progress(text)
