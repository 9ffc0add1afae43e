"""Benchmark the local API's gRPC transport against HTTP binary, dynamic batching, and many models at once.

One run measures, on a tiny ONNX model (x[1,16] @ W + b, from ``bench_api.py``) and a ResNet-style CNN at
224² (``cnn.py``, 602 KB FP32 input, dynamic batch), each served by an edgepack subprocess (HTTP and gRPC
on one app, real onnxruntime sessions through the runtime backend):

1. **gRPC vs HTTP binary** at concurrency 1/4/16: p50, p99, requests/s and the server's CPU per request
   (user+system from /proc over the window). HTTP load: ``bench_api.measure_api`` (geventhttpclient
   greenlets, tritonclient's encoder, body encoded once per client). gRPC load: N coroutines on one
   ``grpc.aio`` channel sending a ``ModelInferRequest`` serialized once (tritonclient's own stubs build
   it, as ``tritonclient.grpc`` would, with ``raw_input_contents``), so neither client re-encodes per call.
2. **Dynamic batching** on the CNN at concurrency 16 (max_batch_size 8, max_queue_delay 2 ms) against the
   same server without it, and at concurrency 1 (the delay's cost when nothing can be batched).
3. **Three models hammered at once** (three copies of the CNN, concurrency 4 each, gRPC) against one
   alone: with onnxruntime's defaults (intra-op threads = cores, spinning on) and with
   ``thread_budget = 2`` (bounded threads, no spinning, runs share the budget), 2 or 1 threads a model.

In 2 and 3 every variant's server is up at once and the variants are measured in turns (``--rounds``,
A B C A B C ...), so load from elsewhere on a shared machine hits them alike; a row gives the mean
req/s and the median p50/p99 of its rounds.

    .venv/bin/python scripts/bench/bench_grpc.py [--duration 2] [--skip-multi]

Results: scripts/bench/results/grpc.{json,md}. Client and server share this machine's cores: compare
rows of one run, not runs of different machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from cnn import resnet_like  # noqa: E402
from results import load_script, write_results  # noqa: E402

api = load_script(HERE / "bench_api.py", "bench_api")
log = logging.getLogger("bench_grpc")

CONCURRENCY = (1, 4, 16)
CNN_PATH = REPO / ".cache" / "bench" / "resnet_like_224_dyn.onnx"


def cnn_model() -> Path:
    if not CNN_PATH.exists():
        CNN_PATH.parent.mkdir(parents=True, exist_ok=True)
        resnet_like(CNN_PATH, image=224, width=32, blocks=4, batch="batch")
    return CNN_PATH


# --- the server subprocess -----------------------------------------------------------------------


@dataclass
class ServerSpec:
    """What the server subprocess serves: model name -> ONNX path, plus the serving settings."""

    models: dict[str, str]
    threads: int | None = 1  # intra-op threads per session; None: onnxruntime's default (the cores)
    spinning: bool | None = False  # None: onnxruntime's default (on)
    thread_budget: int | None = None
    batching: dict[str, dict[str, Any]] | None = None  # model -> ModelServingSettings fields
    workers: int = 4


def serve(spec: ServerSpec, http_port: int, grpc_port: int) -> None:
    """Run in the subprocess: load every model through the runtime backend, serve HTTP and gRPC."""
    from edgepack.agent.api import serve as serve_api
    from edgepack.agent.api.static_repository import StaticRepository
    from edgepack.agent.config import ModelServingSettings
    from edgepack.agent.threads import ServingPlan
    from edgepack.runtimes.base import RuntimeOptions, get_backend
    from edgepack.runtimes.threads import ThreadBudget

    plan = ServingPlan(
        ThreadBudget(spec.thread_budget) if spec.thread_budget else None,
        {name: ModelServingSettings(**s) for name, s in (spec.batching or {}).items()},
        threads=spec.threads,
    )
    served = []
    for name, path in spec.models.items():
        options = plan.runtime_options(name, RuntimeOptions(threads=spec.threads, spinning=spec.spinning))
        loaded = plan.wrap(name, "onnxruntime", get_backend("onnxruntime").load(Path(path), options=options))
        served.append(api.BenchModel(name, "1.0.0", "onnxruntime_onnx", loaded.inputs, loaded.outputs, loaded.infer))
    workers = max(spec.workers, plan.batch_threads)
    serve_api(StaticRepository(served), port=http_port, grpc_port=grpc_port, workers=workers,
              max_concurrent_requests=4 * 64)  # fmt: skip


def start(spec: ServerSpec) -> tuple[subprocess.Popen[bytes], str, str]:
    http_port, grpc_port = api.free_port(), api.free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", json.dumps(asdict(spec)), str(http_port),
           str(grpc_port)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"127.0.0.1:{http_port}"
    api.wait_ready(url, proc, 180, list(spec.models))
    return proc, url, f"127.0.0.1:{grpc_port}"


# --- the gRPC load client ------------------------------------------------------------------------


def grpc_request(model: str, feed: tuple[str, np.ndarray, str]) -> bytes:
    """A ModelInferRequest serialized once, built with tritonclient's own stubs as tritonclient.grpc does."""
    from tritonclient.grpc import service_pb2

    name, array, out_name = feed
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=list(array.shape))
    request.outputs.add(name=out_name)
    request.raw_input_contents.append(array.tobytes())
    return request.SerializeToString()


def grpc_output(data: bytes) -> np.ndarray:
    from tritonclient.grpc import service_pb2

    response = service_pb2.ModelInferResponse.FromString(data)
    shape = list(response.outputs[0].shape)
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(shape)


async def _grpc_load(
    url: str, body: bytes, concurrency: int, duration: float, warmup: float
) -> tuple[list[float], int, float, float]:
    import grpc

    async with grpc.aio.insecure_channel(url, options=[("grpc.max_receive_message_length", -1)]) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        await call(body)
        latencies: list[float] = []
        failures = [0]
        start = time.perf_counter()
        measure_from, stop_at = start + warmup, start + warmup + duration

        async def worker() -> None:
            while (t0 := time.perf_counter()) < stop_at:
                try:
                    await call(body)
                except grpc.aio.AioRpcError:
                    failures[0] += 1
                    continue
                if t0 >= measure_from:
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, failures[0], measure_from, stop_at


def measure_grpc(
    url: str, model: str, feed: tuple[str, np.ndarray, str], concurrency: int, duration: float, warmup: float,
    expected: np.ndarray, server_pid: int,
) -> Any:  # fmt: skip
    import grpc

    row = api.Row(model, "edgepack", "grpc", concurrency)
    body = grpc_request(model, feed)
    with grpc.insecure_channel(url) as channel:
        first = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(body)
    np.testing.assert_allclose(grpc_output(first), expected, rtol=1e-4, atol=1e-5)
    cpu_start = [0.0]

    async def run() -> tuple[list[float], int]:
        task = asyncio.ensure_future(_grpc_load(url, body, concurrency, duration, warmup))
        await asyncio.sleep(warmup + 0.05)
        cpu_start[0] = api.server_cpu_s(server_pid)
        latencies, failed, _, _ = await task
        return latencies, failed

    latencies, row.failed = asyncio.run(run())
    cpu_end = api.server_cpu_s(server_pid)
    api._fill(row, latencies, duration)
    if row.requests:
        row.server_cpu_ms_per_req = round(1e3 * (cpu_end - cpu_start[0]) / row.requests, 3)
    return row


# --- the run -------------------------------------------------------------------------------------


def _expected(path: Path, feed: tuple[str, np.ndarray, str]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([feed[2]], {feed[0]: feed[1]})[0]


def _feeds() -> dict[str, tuple[str, np.ndarray, str]]:
    rng = np.random.default_rng(1)
    return {
        "tiny": ("x", rng.standard_normal((1, api.TINY_IN)).astype(np.float32), "y"),
        "cnn": ("input", rng.standard_normal((1, 3, 224, 224)).astype(np.float32), "logits"),
    }


def _row(row: Any, scenario: str, **extra: Any) -> dict[str, Any]:
    doc = {"scenario": scenario, **{k: v for k, v in asdict(row).items() if k not in ("extra", "path")}}
    doc.update(extra)
    return doc


def transports(duration: float, warmup: float) -> list[dict[str, Any]]:
    paths = {"tiny": api.tiny_model(), "cnn": cnn_model()}
    data = _feeds()
    expected = {m: _expected(paths[m], data[m]) for m in paths}
    proc, http_url, grpc_url = start(ServerSpec({m: str(p) for m, p in paths.items()}))
    rows = []
    try:
        for model in ("tiny", "cnn"):
            for c in CONCURRENCY:
                g = measure_grpc(grpc_url, model, data[model], c, duration, warmup, expected[model], proc.pid)
                h = api.measure_api(http_url, "edgepack", model, data[model], True, c, duration, warmup,
                                    expected[model], server_pid=proc.pid)  # fmt: skip
                rows += [_row(g, "transport"), _row(h, "transport")]
                log.info("%s c=%d grpc p50 %.3f ms %.0f/s | http %.3f ms %.0f/s", model, c, g.p50_ms, g.rps, h.p50_ms, h.rps)
    finally:
        api.stop(proc)
    return rows


def _alternate(measures: dict[str, Any], rounds: int) -> dict[str, dict[str, Any]]:
    """Each measure ``rounds`` times, interleaved (A B C A B C ...), so load from elsewhere on a shared
    machine hits every variant alike; per variant: mean req/s, median p50/p99, mean server CPU."""
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in measures}
    for _ in range(rounds):
        for label, measure in measures.items():
            runs[label].append(measure())
    out = {}
    for label, docs in runs.items():
        cpu = [d["server_cpu_ms_per_req"] for d in docs if d.get("server_cpu_ms_per_req")]
        out[label] = {
            **{k: v for k, v in docs[0].items() if k not in ("requests", "rps", "p50_ms", "p99_ms", "failed")},
            "rounds": rounds,
            "requests": sum(d["requests"] for d in docs),
            "rps": round(float(np.mean([d["rps"] for d in docs])), 1),
            "p50_ms": round(float(np.median([d["p50_ms"] for d in docs])), 3),
            "p99_ms": round(float(np.median([d["p99_ms"] for d in docs])), 3),
            "server_cpu_ms_per_req": round(float(np.mean(cpu)), 3) if cpu else None,
            "failed": sum(d.get("failed", 0) for d in docs),
        }
    return out


def batching(duration: float, warmup: float, rounds: int) -> list[dict[str, Any]]:
    """The CNN with batching off and on, both servers up, measured in turns."""
    data = _feeds()
    expected = _expected(cnn_model(), data["cnn"])
    settings = {"cnn": {"max_batch_size": 8, "max_queue_delay_us": 2000, "batching": True}}
    specs = {"off": ServerSpec({"cnn": str(cnn_model())}), "on": ServerSpec({"cnn": str(cnn_model())}, batching=settings)}
    servers = {label: start(spec) for label, spec in specs.items()}
    rows = []
    try:
        for c in (1, 16):
            measures = {
                label: (lambda p=proc, u=url, c=c: asdict(
                    measure_grpc(u, "cnn", data["cnn"], c, duration / rounds, warmup, expected, p.pid)))
                for label, (proc, _, url) in servers.items()
            }  # fmt: skip
            for label, row in _alternate(measures, rounds).items():
                rows.append({"scenario": f"batching {label}", **{k: v for k, v in row.items() if k not in ("path", "extra")}})
                log.info("batching %s c=%d p50 %.2f ms %.1f/s", label, c, row["p50_ms"], row["rps"])
    finally:
        for proc, _, _ in servers.values():
            api.stop(proc)
    return rows


def many_models(duration: float, warmup: float, rounds: int) -> list[dict[str, Any]]:
    """Three CNNs served together, hammered at once vs one alone, per thread setting; variants in turns."""
    data = _feeds()
    expected = _expected(cnn_model(), data["cnn"])
    names = ["cnn_a", "cnn_b", "cnn_c"]
    variants = {
        "onnxruntime defaults": {"threads": None, "spinning": None},
        "thread_budget=2, 2 threads a model": {"threads": None, "spinning": None, "thread_budget": 2},
        "thread_budget=2, 1 thread a model": {"threads": 1, "spinning": None, "thread_budget": 2},
    }
    servers = {label: start(ServerSpec(dict.fromkeys(names, str(cnn_model())), **extra)) for label, extra in variants.items()}
    rows = []
    try:
        alone = {
            label: (lambda p=proc, u=url: asdict(measure_grpc(u, "cnn_a", data["cnn"], 4, duration / rounds, warmup,
                                                               expected, p.pid)))
            for label, (proc, _, url) in servers.items()
        }  # fmt: skip
        together = {
            label: (lambda u=url: {"model": "+".join(names), "mode": "grpc", "concurrency": 12,
                                   **asyncio.run(_together(u, names, data["cnn"], duration / rounds, warmup))})
            for label, (_, _, url) in servers.items()
        }  # fmt: skip
        for label, row in _alternate(alone, rounds).items():
            rows.append({"scenario": f"one model alone, {label}", "models_hammered": 1,
                         **{k: v for k, v in row.items() if k not in ("path", "extra")}})  # fmt: skip
        for label, row in _alternate(together, rounds).items():
            rows.append({"scenario": f"three models at once, {label}", "models_hammered": 3, **row})
            log.info("%s: three at once %.1f/s p99 %.1f ms", label, row["rps"], row["p99_ms"])
    finally:
        for proc, _, _ in servers.values():
            api.stop(proc)
    return rows


async def _together(url: str, names: list[str], feed: tuple[str, np.ndarray, str], duration: float, warmup: float):
    results = await asyncio.gather(*(_grpc_load(url, grpc_request(n, feed), 4, duration, warmup) for n in names))
    latencies = [x for r in results for x in r[0]]
    lat = np.array(latencies) * 1e3
    return {
        "requests": len(latencies),
        "rps": round(len(latencies) / duration, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "failed": sum(r[1] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds measured per row")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up per row")
    parser.add_argument("--rounds", type=int, default=3, help="turns per variant in the batching/multi rows")
    parser.add_argument("--skip-multi", action="store_true", help="skip the three-models rows")
    parser.add_argument("--only", choices=["transport", "batching", "multi"], help="run one part only")
    parser.add_argument("--serve", nargs=3, metavar=("SPEC", "HTTP", "GRPC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.serve:
        serve(ServerSpec(**json.loads(args.serve[0])), int(args.serve[1]), int(args.serve[2]))
        return
    rows: list[dict[str, Any]] = []
    if args.only in (None, "transport"):
        rows += transports(args.duration, args.warmup)
    if args.only in (None, "batching"):
        rows += batching(args.duration, args.warmup, args.rounds)
    if args.only in (None, "multi") and not args.skip_multi:
        rows += many_models(args.duration, args.warmup, args.rounds)
    notes = [
        "server: one edgepack subprocess per scenario (HTTP + gRPC on one app, 4 inference threads, "
        "onnxruntime 1 intra-op thread and spinning off unless the scenario says otherwise)",
        "server_cpu_ms_per_req: the server's user+system CPU over the window / requests answered",
        "client and server share this machine's cores; the machine was shared with other work during the run",
    ]
    md = write_results("grpc", rows, title="Local API: gRPC vs HTTP binary, dynamic batching, many models", notes=notes)
    print(md.read_text())


if __name__ == "__main__":
    main()
