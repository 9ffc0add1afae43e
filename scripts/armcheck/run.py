"""Run guest.py over all bundles: natively on the host, and in the rootfs under qemu, one process per CPU.

Every platform gets one process that handles every bundle (an emulated Python start with numpy and
LiteRT costs seconds; paying it once per CPU, not once per bundle and CPU, is what keeps the check fast),
and all processes run at the same time. The guest command line is::

    qemu-aarch64-static -cpu MODEL -L VIEW VIEW/usr/bin/python3.11 -E -s -S -B guest.py JOB.json

``-E -s -S``: no PYTHON* variables, no user or system site-packages (qemu falls back to the *host's* file
for any path missing under VIEW, so the host's x86 dist-packages must never be looked at); the job names
the site folders. ``-B``: the guest writes no .pyc (a write under /usr would land on the host). The
environment is a clean, minimal one for the same reason.

LiteRT logs "Created TensorFlow Lite XNNPACK delegate for CPU." once per process, on stderr, which is
kept per platform in ``<label>.log``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from armcheck.cpus import Emulator
from armcheck.rootfs import CpuView

log = logging.getLogger(__name__)

GUEST = Path(__file__).resolve().with_name("guest.py")
GUEST_PYTHON_FLAGS = ("-E", "-s", "-S", "-B")
XNNPACK_LOG_LINE = "Created TensorFlow Lite XNNPACK delegate for CPU"
HOST = "host"


@dataclass(frozen=True)
class Platform:
    """Where guest.py runs: a label (``host`` or the CPU model), its command line, sys.path and environment."""

    label: str
    command: list[str]
    site: list[Path]
    env: dict[str, str]
    features: list[str] = field(default_factory=list)


@dataclass
class BundleRun:
    """One bundle on one platform: the guest's result.json (None when the process died first)."""

    bundle: Path
    out: Path
    started: bool
    result: dict[str, Any] | None

    def outputs(self) -> dict[tuple[int, str], Any]:
        """(sample, output name) -> array, from outputs.npz."""
        import numpy as np

        names = (self.result or {}).get("outputs", [])
        with np.load(self.out / "outputs.npz", allow_pickle=False) as npz:
            result = {}
            for key in npz.files:
                sample, index = key[1:].split("_o")
                result[(int(sample), names[int(index)])] = npz[key]
            return result


@dataclass
class PlatformRun:
    """One platform's process: how it ended, its stderr, and each bundle's run."""

    platform: Platform
    returncode: int | None  # None: killed after the timeout
    log_file: Path
    bundles: list[BundleRun]

    @property
    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    @property
    def xnnpack_logged(self) -> bool:
        return XNNPACK_LOG_LINE in self.log

    def log_tail(self, lines: int = 12) -> str:
        return "\n".join(self.log.strip().splitlines()[-lines:])


def host_platform() -> Platform:
    """This machine's own Python and edgepack: the reference outputs."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return Platform(HOST, [sys.executable, "-B", str(GUEST)], [], env)


def emulated_platform(emulator: Emulator, view: CpuView, site: list[Path], work: Path) -> Platform:
    command = emulator.argv(view.cpu, view.root, view.python, *GUEST_PYTHON_FLAGS, str(GUEST))
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
    return Platform(view.cpu, command, site, env, view.features)


def run_all(
    platforms: list[Platform], bundles: list[Path], trust: Path, work: Path, threads: int, timeout: float
) -> dict[str, PlatformRun]:
    """Start every platform's process at once, wait for all (each up to ``timeout`` s), collect the runs."""
    started = time.monotonic()
    running = []
    for platform in platforms:
        folder = work / platform.label
        folder.mkdir(parents=True)
        job = {
            "label": platform.label,
            "site": [str(p) for p in platform.site],
            "trust": str(trust.resolve()),
            "threads": threads,
            "work": str(folder),
            "bundles": [{"path": str(b.resolve()), "out": str(folder / f"bundle-{i}")} for i, b in enumerate(bundles)],
        }
        (folder / "job.json").write_text(json.dumps(job, indent=1))
        log_file = work / f"{platform.label}.log"
        with open(log_file, "wb") as log_fh:
            proc = subprocess.Popen(
                [*platform.command, str(folder / "job.json")],
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=platform.env,
                cwd=folder,
            )
        running.append((platform, proc, log_file, folder))
        log.debug("started %s: %s", platform.label, " ".join(platform.command))
    runs: dict[str, PlatformRun] = {}
    for platform, proc, log_file, folder in running:
        left = max(1.0, timeout - (time.monotonic() - started))
        try:
            returncode: int | None = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            returncode = None
        runs[platform.label] = PlatformRun(platform, returncode, log_file, _collect(bundles, folder))
        log.info("%s finished (exit %s)", platform.label, returncode)
    return runs


def _collect(bundles: list[Path], folder: Path) -> list[BundleRun]:
    collected = []
    for index, bundle in enumerate(bundles):
        out = folder / f"bundle-{index}"
        result_file = out / "result.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else None
        collected.append(BundleRun(bundle, out, (out / "started").exists(), result))
    return collected
