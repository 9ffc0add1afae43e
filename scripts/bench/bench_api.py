"""Benchmark the agent's local inference API against the raw in-process call and against MLServer.

One run measures, side by side:

- ``raw``: ``model.infer`` called in this process (threads for concurrency > 1);
- ``edgepack`` binary and JSON: tritonclient round trips to our API, served by a subprocess;
- ``mlserver``: MLServer (installed in its own venv, /work/venvs/mlserver, as it pins other deps)
  serving the same tiny model through a small custom ``MLModel`` runtime, same load client.

on (a) a tiny model (x[1,16] @ W[16,8] + b, numpy) and (b) a heavy one (an onnxruntime CNN made with
onnx.helper, ~15–20 ms a call here). The load client is tritonclient's HTTP client; concurrency N is N gevent
greenlets sharing a client with an N-connection pool. Results go to scripts/bench/results/api.{json,md}.

    .venv/bin/python scripts/bench/bench_api.py [--duration 3] [--mlserver-venv /work/venvs/mlserver]

MLServer's venv: ``python -m venv /work/venvs/mlserver && /work/venvs/mlserver/bin/pip install mlserver
"uvloop<0.22"`` (MLServer 1.7.1's inference worker processes crash with uvloop 0.22, SeldonIO/MLServer#2286).
Where it is missing the table says so instead of showing figures.

Both servers and the client share this machine's cores, so absolute figures are lower than on a device
with the client elsewhere; compare rows of one run, not runs of different machines.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench_api")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from cnn import resnet_like  # noqa: E402

TINY_IN, TINY_OUT = 16, 8
CONCURRENCY = (1, 4, 16)


# --- models --------------------------------------------------------------------------------------


def tiny_weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((TINY_IN, TINY_OUT)).astype(np.float32), rng.standard_normal(TINY_OUT).astype(np.float32)


def heavy_model(path: Path | None) -> Path:
    """The heavy model: ``path`` when given (e.g. .cache/bench/resnet50.onnx), else a generated ResNet-style CNN."""
    if path is not None:
        return path
    default = REPO / ".cache" / "bench" / "resnet_like_64.onnx"
    if not default.exists():
        default.parent.mkdir(parents=True, exist_ok=True)
        resnet_like(default, image=64, width=64, blocks=4)
    return default


@dataclass
class BenchModel:
    """A ServedModel for the benchmark: a function of the input dict."""

    name: str
    version: str
    platform: str
    inputs: list[Any]
    outputs: list[Any]
    fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.fn(inputs)


def make_models(heavy: Path) -> dict[str, BenchModel]:
    import onnxruntime as ort

    from edgepack.manifest import TensorSpec

    w, b = tiny_weights()
    options = ort.SessionOptions()
    # no busy-waiting worker threads: on 2 cores they would steal the CPU the HTTP path needs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(heavy), options, providers=["CPUExecutionProvider"])
    heavy_in, heavy_out = session.get_inputs()[0], session.get_outputs()[0]
    return {
        "tiny": BenchModel(
            "tiny",
            "1.0.0",
            "numpy",
            [TensorSpec(name="x", dtype="float32", shape=["batch", TINY_IN])],
            [TensorSpec(name="y", dtype="float32", shape=["batch", TINY_OUT])],
            lambda i: {"y": i["x"] @ w + b},
        ),
        "heavy": BenchModel(
            "heavy",
            "1.0.0",
            "onnxruntime_onnx",
            [TensorSpec(name=heavy_in.name, dtype="float32", shape=_dims(heavy_in.shape))],
            [TensorSpec(name=heavy_out.name, dtype="float32", shape=_dims(heavy_out.shape))],
            lambda i: {heavy_out.name: session.run(None, {heavy_in.name: i[heavy_in.name]})[0]},
        ),
    }


def _dims(shape: list[Any]) -> list[int | str]:
    return [d if isinstance(d, int) else str(d or "?") for d in shape]


def feeds(models: dict[str, BenchModel], image: int) -> dict[str, tuple[str, np.ndarray, str]]:
    """model -> (input name, input array, output name); dynamic dims: batch 1, spatial ``image``."""
    rng = np.random.default_rng(1)
    heavy = models["heavy"]
    heavy_shape = [d if isinstance(d, int) else (1 if i == 0 else image) for i, d in enumerate(heavy.inputs[0].shape)]
    return {
        "tiny": ("x", rng.standard_normal((1, TINY_IN)).astype(np.float32), "y"),
        "heavy": (heavy.inputs[0].name, rng.standard_normal(heavy_shape).astype(np.float32), heavy.outputs[0].name),
    }


# --- measuring -----------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    path: str  # raw | edgepack | mlserver
    mode: str  # in-process | binary | json
    concurrency: int
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _fill(row: Row, latencies: list[float], window: float) -> Row:
    if latencies:
        lat = np.array(latencies) * 1e3
        row.requests = len(latencies)
        row.rps = round(len(latencies) / window, 1)
        row.p50_ms = round(float(np.percentile(lat, 50)), 3)
        row.p99_ms = round(float(np.percentile(lat, 99)), 3)
    return row


def measure_raw(
    model: BenchModel, feed: dict[str, np.ndarray], concurrency: int, duration: float, warmup: float
) -> Row:
    latencies: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    def worker() -> None:
        mine = []
        while (t0 := time.perf_counter()) < stop_at:
            model.infer(feed)
            if t0 >= measure_from:
                mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _fill(Row(model.name, "raw", "in-process", concurrency), latencies, duration)


def measure_api(
    url: str,
    path: str,
    model: str,
    feed: tuple[str, np.ndarray, str],
    binary: bool,
    concurrency: int,
    duration: float,
    warmup: float,
    expected: np.ndarray,
) -> Row:
    import gevent
    import tritonclient.http as httpclient

    row = Row(model, path, "binary" if binary else "json", concurrency)
    name, array, out_name = feed
    client = httpclient.InferenceServerClient(url, concurrency=concurrency, connection_timeout=60, network_timeout=60)
    inputs = [httpclient.InferInput(name, list(array.shape), "FP32").set_data_from_numpy(array, binary_data=binary)]
    outputs = [httpclient.InferRequestedOutput(out_name, binary_data=binary)]
    try:
        first = client.infer(model, inputs, outputs=outputs).as_numpy(out_name)
        np.testing.assert_allclose(first, expected, rtol=1e-4, atol=1e-5)
    except Exception as exc:  # a server that cannot do this mode: say so in the table
        row.note = f"failed: {str(exc).splitlines()[0][:140]}"
        client.close()
        return row
    latencies: list[float] = []
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    def worker() -> None:
        while (t0 := time.perf_counter()) < stop_at:
            client.infer(model, inputs, outputs=outputs)
            if t0 >= measure_from:
                latencies.append(time.perf_counter() - t0)

    gevent.joinall([gevent.spawn(worker) for _ in range(concurrency)], raise_error=True)
    client.close()
    return _fill(row, latencies, duration)


def measure_paired(
    url: str, model: BenchModel, feed: tuple[str, np.ndarray, str], pairs: int, warmup: int = 10
) -> tuple[Row, Row]:
    """Concurrency 1, raw call and binary API call alternating, so drift on a noisy machine hits both alike."""
    import tritonclient.http as httpclient

    name, array, out_name = feed
    client = httpclient.InferenceServerClient(url)
    inputs = [httpclient.InferInput(name, list(array.shape), "FP32").set_data_from_numpy(array, binary_data=True)]
    outputs = [httpclient.InferRequestedOutput(out_name, binary_data=True)]
    raw_lat: list[float] = []
    api_lat: list[float] = []
    for i in range(warmup + pairs):
        t0 = time.perf_counter()
        model.infer({name: array})
        t1 = time.perf_counter()
        client.infer(model.name, inputs, outputs=outputs)
        t2 = time.perf_counter()
        if i >= warmup:
            raw_lat.append(t1 - t0)
            api_lat.append(t2 - t1)
    client.close()
    total = sum(raw_lat) + sum(api_lat)
    raw = _fill(Row(model.name, "raw (paired)", "in-process", 1), raw_lat, total)
    api = _fill(Row(model.name, "edgepack (paired)", "binary", 1), api_lat, total)
    raw.rps = api.rps = 0.0  # alternating calls: throughput is not meaningful here
    raw.note = api.note = f"{pairs} alternating raw/API calls; p50 is the figure to compare"
    return raw, api


# --- servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float, models: list[str]) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if all(client.is_model_ready(m) for m in models):
                client.close()
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server on {url} not ready after {timeout:.0f}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_edgepack(port: int, workers: int, heavy: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", str(port), "--workers", str(workers)]
    cmd += ["--heavy-model", str(heavy)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def serve_edgepack(port: int, workers: int, heavy: Path) -> None:
    from edgepack.agent.api import serve
    from edgepack.agent.api.static_repository import StaticRepository

    serve(StaticRepository(make_models(heavy).values()), port=port, workers=workers)


MLSERVER_RUNTIME = """
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class TinyModel(MLModel):
    async def load(self) -> bool:
        rng = np.random.default_rng(0)
        self.w = rng.standard_normal(({n_in}, {n_out})).astype(np.float32)
        self.b = rng.standard_normal({n_out}).astype(np.float32)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        y = x @ self.w + self.b
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("y", y)])
"""


def start_mlserver(venv: Path, port: int, workdir: Path, parallel_workers: int) -> subprocess.Popen[bytes]:
    (workdir / "bench_runtime.py").write_text(textwrap.dedent(MLSERVER_RUNTIME).format(n_in=TINY_IN, n_out=TINY_OUT))
    settings = {
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": parallel_workers,
        "host": "127.0.0.1",
    }
    (workdir / "settings.json").write_text(json.dumps(settings))
    (workdir / "model-settings.json").write_text(
        json.dumps({"name": "tiny", "implementation": "bench_runtime.TinyModel"})
    )
    log = open(workdir / "mlserver.log", "wb")  # noqa: SIM115 - kept open for the server's lifetime
    return subprocess.Popen(
        [str(venv / "bin" / "mlserver"), "start", str(workdir)], cwd=workdir, stdout=log, stderr=subprocess.STDOUT
    )


# --- the run -------------------------------------------------------------------------------------


def run(duration: float, warmup: float, mlserver_venv: Path, workers: int, heavy: Path, image: int) -> list[Row]:
    models = make_models(heavy)
    data = feeds(models, image)
    expected = {m: models[m].infer({data[m][0]: data[m][1]})[data[m][2]] for m in data}
    rows: list[Row] = []
    port = free_port()
    proc = start_edgepack(port, workers, heavy)
    try:
        wait_ready(f"127.0.0.1:{port}", proc, 60, ["tiny", "heavy"])
        for name in ("tiny", "heavy"):  # raw rows next to the API rows of the same model (an idle server costs nothing)
            feed = {data[name][0]: data[name][1]}
            for c in CONCURRENCY:
                rows.append(measure_raw(models[name], feed, c, duration, warmup))
                log.info("raw %s c%d: %.0f rps", name, c, rows[-1].rps)
            for binary in (True, False):
                for c in CONCURRENCY:
                    row = measure_api(
                        f"127.0.0.1:{port}", "edgepack", name, data[name], binary, c, duration, warmup, expected[name]
                    )
                    rows.append(row)
                    log.info("edgepack %s %s c%d: %.0f rps %s", name, row.mode, c, row.rps, row.note)
        rows.extend(measure_paired(f"127.0.0.1:{port}", models["heavy"], data["heavy"], pairs=150))
        log.info("paired heavy: raw p50 %.2f ms, API p50 %.2f ms", rows[-2].p50_ms, rows[-1].p50_ms)
    finally:
        stop(proc)
    rows += run_mlserver(mlserver_venv, data["tiny"], expected["tiny"], duration, warmup)
    return rows


def run_mlserver(
    venv: Path, feed: tuple[str, np.ndarray, str], expected: np.ndarray, duration: float, warmup: float
) -> list[Row]:
    if not (venv / "bin" / "mlserver").exists():
        return [Row("tiny", "mlserver", "binary", 16, note=f"not run: MLServer is not installed in {venv}")]
    rows: list[Row] = []
    for parallel_workers in (1, 0):  # 1 is MLServer's default (inference in a worker process); 0: in-process
        port = free_port()
        workdir = Path(tempfile.mkdtemp(prefix="bench-mlserver-"))
        proc = start_mlserver(venv, port, workdir, parallel_workers)
        try:
            wait_ready(f"127.0.0.1:{port}", proc, 90, ["tiny"])
            for binary, c in ((True, 16), (False, 16), (False, 1)):
                row = measure_api(f"127.0.0.1:{port}", "mlserver", "tiny", feed, binary, c, duration, warmup, expected)
                row.path = f"mlserver (parallel_workers={parallel_workers})"
                if binary and row.note:
                    row.note = f"unsupported: MLServer's REST API has no binary tensor data extension ({row.note})"
                rows.append(row)
                log.info("%s %s c%d: %.0f rps %s", row.path, row.mode, c, row.rps, row.note)
        except RuntimeError as exc:
            rows.append(Row("tiny", f"mlserver (parallel_workers={parallel_workers})", "binary", 16, note=str(exc)))
        finally:
            stop(proc)
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def mlserver_version(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run(
        [str(python), "-c", "import mlserver; print(mlserver.__version__)"], capture_output=True, text=True
    )
    return out.stdout.strip() or None


def _find(rows: list[Row], model: str, path: str, mode: str, c: int) -> Row | None:
    for r in rows:
        if r.model == model and r.path == path and r.mode == mode and r.concurrency == c and r.requests:
            return r
    return None


def goals(rows: list[Row]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ml_c16 = [r for r in rows if r.path.startswith("mlserver") and r.concurrency == 16 and r.requests]
    best_ml = max(ml_c16, key=lambda r: r.rps, default=None)
    for mode in ("binary", "json"):
        ours = _find(rows, "tiny", "edgepack", mode, 16)
        if ours and best_ml:
            ratio = ours.rps / best_ml.rps
            out[f"tiny_c16_{mode}_vs_best_mlserver"] = {
                "edgepack_rps": ours.rps,
                "mlserver_rps": best_ml.rps,
                "mlserver_row": f"{best_ml.path} {best_ml.mode}",
                "ratio": round(ratio, 2),
                "goal": ">= 2.0" if mode == "binary" else "(context)",
                "met": ratio >= 2.0,
            }
    pairs = [
        (
            "binary_paired",
            _find(rows, "heavy", "raw (paired)", "in-process", 1),
            _find(rows, "heavy", "edgepack (paired)", "binary", 1),
        ),
        ("binary", _find(rows, "heavy", "raw", "in-process", 1), _find(rows, "heavy", "edgepack", "binary", 1)),
        ("json", _find(rows, "heavy", "raw", "in-process", 1), _find(rows, "heavy", "edgepack", "json", 1)),
    ]
    for mode, raw, api in pairs:
        if raw and api:
            overhead = (api.p50_ms - raw.p50_ms) / raw.p50_ms
            out[f"heavy_c1_{mode}_p50_overhead"] = {
                "raw_p50_ms": raw.p50_ms,
                "api_p50_ms": api.p50_ms,
                "overhead_pct": round(100 * overhead, 2),
                "goal": "< 5%" if mode == "binary_paired" else "(context)",
                "met": overhead < 0.05,
            }
    return out


def markdown(rows: list[Row], meta: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = [
        "# Local API benchmark",
        "",
        f"Machine: {meta['cpus']} CPUs, {meta['platform']}, Python {meta['python']}; client, servers and raw "
        "calls share these cores. "
        f"Each row: {meta['duration_s']} s measured after {meta['warmup_s']} s warm-up; tritonclient HTTP load client "
        "(N gevent greenlets, N-connection pool). "
        f"edgepack: {meta['edgepack_workers']} inference threads. MLServer: {meta['mlserver'] or 'not installed'}.",
        "",
        "| model | path | mode | conc. | req/s | p50 ms | p99 ms | note |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rps = f"{r.rps:.0f}" if r.rps else "—"
        p50 = f"{r.p50_ms:.2f}" if r.requests else "—"
        p99 = f"{r.p99_ms:.2f}" if r.requests else "—"
        lines.append(f"| {r.model} | {r.path} | {r.mode} | {r.concurrency} | {rps} | {p50} | {p99} | {r.note} |")
    lines += ["", "## Goals", ""]
    for key, value in summary.items():
        lines.append(f"- `{key}`: {json.dumps(value)}")
    if not summary:
        lines.append("- not computed (rows missing)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per row")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up per row")
    parser.add_argument("--workers", type=int, default=4, help="edgepack inference threads")
    parser.add_argument("--mlserver-venv", type=Path, default=Path("/work/venvs/mlserver"))
    parser.add_argument("--heavy-model", type=Path, help="ONNX model for the heavy rows (default: a generated CNN)")
    parser.add_argument("--heavy-image", type=int, default=224, help="side of the heavy model's image when dynamic")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the server subprocess
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.serve:
        serve_edgepack(args.serve, args.workers, heavy_model(args.heavy_model))
        return
    started = time.monotonic()
    heavy = heavy_model(args.heavy_model)
    rows = run(args.duration, args.warmup, args.mlserver_venv, args.workers, heavy, args.heavy_image)
    meta = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "edgepack_workers": args.workers,
        "mlserver": mlserver_version(args.mlserver_venv),
        "heavy_model": heavy.name,
        "heavy_image": args.heavy_image,
        "wall_s": round(time.monotonic() - started, 1),
    }
    summary = goals(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "api.json").write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows], "goals": summary}, indent=2) + "\n"
    )
    (RESULTS / "api.md").write_text(markdown(rows, meta, summary))
    print(markdown(rows, meta, summary))


if __name__ == "__main__":
    main()
