"""The benchmark's peer server: MLServer in its own venv, serving ONNX models with ``runtime.OnnxModel``.

MLServer pins versions of fastapi, pydantic and others that differ from ours, so it lives in its own venv,
``.bench-venvs/mlserver`` (git-ignored), made on first use with pip. Pins: MLServer 1.7.1 with
``uvloop<0.22`` (its inference worker processes crash with uvloop 0.22, SeldonIO/MLServer#2286), and the
onnxruntime version of our own venv, so both servers run the same runtime build.

    venv = ensure_venv()                 # creates it once; raises PeerUnavailable when pip cannot
    proc = start(venv, port, {"tiny": Path("tiny.onnx")}, workdir)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
VENV = REPO / ".bench-venvs" / "mlserver"
MLSERVER = "mlserver==1.7.1"
UVLOOP = "uvloop<0.22"


class PeerUnavailable(RuntimeError):
    """MLServer's venv could not be made or its server did not start; the report says so instead of figures."""


def requirements() -> list[str]:
    import onnxruntime

    return [MLSERVER, UVLOOP, f"onnxruntime=={onnxruntime.__version__}"]


def ensure_venv(venv: Path = VENV) -> Path:
    """The venv with MLServer installed, made with pip on first use (a stamp records what it holds)."""
    stamp = venv / ".peer-requirements"
    want = "\n".join(requirements())
    if stamp.exists() and stamp.read_text() == want and (venv / "bin" / "mlserver").exists():
        return venv
    log.info("making MLServer's venv in %s (%s); once", venv, ", ".join(requirements()))
    base = getattr(sys, "_base_executable", sys.executable)
    try:
        if not (venv / "bin" / "python").exists():
            subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             *requirements()],
            check=True, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise PeerUnavailable(f"could not install {', '.join(requirements())} into {venv}: {detail[-400:]}") from exc
    stamp.write_text(want)
    return venv


def version(venv: Path = VENV) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run([str(python), "-c", "import mlserver; print(mlserver.__version__)"],
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip() or None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    venv: Path, port: int, models: dict[str, Path], workdir: Path, *, parallel_workers: int = 0, threads: int = 1
) -> subprocess.Popen[bytes]:
    """``mlserver start`` on ``workdir`` serving ``models`` (name -> ONNX file) over HTTP on ``port``.

    ``parallel_workers=0`` runs inference in the server process (MLServer's fastest setting on 2 cores; its
    default, 1, adds a worker process and a queue hop)."""
    settings = {"http_port": port, "grpc_port": _free_port(), "metrics_port": _free_port(), "host": "127.0.0.1",
                "parallel_workers": parallel_workers, "metrics_endpoint": None}  # fmt: skip
    (workdir / "settings.json").write_text(json.dumps(settings))
    for name, path in models.items():
        model_dir = workdir / name
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "runtime.OnnxModel",
            "parameters": {"uri": str(path.resolve()), "extra": {"threads": threads}},
        }))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    out = open(workdir / "mlserver.log", "wb")  # noqa: SIM115 - kept open for the server's lifetime
    return subprocess.Popen([str(venv / "bin" / "mlserver"), "start", str(workdir)], cwd=workdir, env=env,
                            stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
