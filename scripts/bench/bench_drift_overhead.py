"""Benchmark: what live drift statistics cost a served request, on a ResNet-style CNN (goal ≤ 2 % of p50).

A ResNet-style CNN (``cnn.py``, 3×224×224 input by default) is compiled by the real compiler (fp32, so its
bundle carries reference statistics of the calibration images), installed in an in-process DeviceAgent
(onnxruntime, ``--threads`` intra-op threads), and driven through the live slot exactly as the local API
runs a request (lease → ``LiveModel.infer`` → the field-data observer). Three settings, interleaved in
``--rounds`` rounds so that a noisy shared machine hits them alike:

- ``off``: no observer (what a bundle without reference statistics gets);
- ``default``: drift with the shipped settings (every request offered, the statistics thread held to
  ``budget_ms_per_s`` = 20 ms per second of one core);
- ``every request``: every request binned, no budget (the worst case of the statistics thread).

Reported per setting: request p50/p90/p99 and the p50 overhead against ``off``; and, measured apart, the
statistics thread's own cost per binned request (input and output binned into the reference bins) and the
request thread's (the observer deciding and handing the arrays over).
Writes scripts/bench/results/drift_overhead.json and .md.

    python scripts/bench/bench_drift_overhead.py --requests 150 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from cnn import resnet_like
from results import machine, write_results

from edgepack.agent.config import CaptureSettings, DriftSettings, load_config
from edgepack.agent.field_data import FieldData
from edgepack.agent.service import DeviceAgent
from edgepack.compiler.pipeline import CompileRequest, compile_model
from edgepack.keys import SigningKey
from edgepack.refstats import LiveCounts
from edgepack.trust import TrustStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--requests", type=int, default=150, help="requests per setting per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-drift-") as tmp_name:
        rows, notes = run(Path(tmp_name), args)
    notes.append(f"machine: {machine()}")
    md = write_results("drift_overhead", rows, title="Live drift statistics: overhead per request", notes=notes)
    print(md.read_text())


def bench(quick: bool) -> dict[str, Any]:
    """The section for ``scripts/bench/suite.py`` (register it there as ``"drift": ("bench_drift_overhead.py",
    600, 120)``)."""
    args = argparse.Namespace(image=224, requests=20 if quick else 40, rounds=4 if quick else 16, threads=1)
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-drift-") as tmp_name:
        rows, notes = run(Path(tmp_name), args)
    default = next(r for r in rows if r["setting"] == "default")
    ratio = round(1 + default["p50_overhead_pct"] / 100, 4)
    return {
        "title": "Live drift statistics: overhead per request",
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "tables": [{"title": "request latency by setting", "rows": rows}],
        "ratios": [
            {
                "what": "p50 with drift (default settings) / p50 without",
                "value": ratio,
                "goal": "<= 1.02",
                "met": ratio <= 1.02,
            }
        ],
        "plots": [],
        "notes": notes,
        "versions": {},
    }


def run(tmp: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    rng = np.random.default_rng(0)
    model = resnet_like(tmp / "cnn.onnx", image=args.image, width=32, blocks=4)
    images = rng.standard_normal((32, 1, 3, args.image, args.image)).astype(np.float32)
    np.savez(tmp / "calibration.npz", input=images)
    key = SigningKey.generate()
    key.save(tmp / "keys", "bench")
    trust = TrustStore.init(tmp / "trust", [tmp / "keys" / "bench.pub"], threshold=1)
    compile_model(CompileRequest(model=model, target="x86", calibration=tmp / "calibration.npz", keys=[key],
                                 output=tmp / "cnn.epk", precision="fp32", name="cnn"))  # fmt: skip
    agent = DeviceAgent(load_config(None, {"state_dir": str(tmp / "state"), "trust_dir": str(trust.directory),
                                           "listen": "127.0.0.1:0", "runtime.threads": args.threads}))  # fmt: skip
    try:
        agent.install(tmp / "cnn.epk")
        live = agent.live.current("cnn")
        assert live is not None
        default = live.observer
        unlimited = FieldData(DriftSettings(budget_ms_per_s=1000.0, queue=4), CaptureSettings(), tmp / "state",
                              bundle_dir=agent.store.bundle_dir).observer_for(live)  # fmt: skip
        settings = {"off": None, "default": default, "every request": unlimited}
        feeds = [rng.standard_normal((1, 3, args.image, args.image)).astype(np.float32) for _ in range(16)]
        live.observer = None
        for _ in range(20):  # warm up
            _request(agent, feeds[0])
        times: dict[str, list[float]] = {name: [] for name in settings}
        for round_ in range(args.rounds):
            order = list(settings) if round_ % 2 == 0 else list(reversed(settings))
            for name in order:
                live.observer = settings[name]
                for i in range(args.requests):
                    start = time.perf_counter()
                    _request(agent, feeds[i % len(feeds)])
                    times[name].append((time.perf_counter() - start) * 1000)
                live.observer = None
                time.sleep(0.2)  # let the statistics thread drain between settings
        observed = {name: (o.monitor.report().observed if o is not None and o.monitor else 0)
                    for name, o in settings.items()}  # fmt: skip
        outputs = live.runtime_model.infer({"input": feeds[0]})
        bin_ms = _binning_ms(default, feeds[0], outputs)
        call_us = _call_us(default, feeds[0], outputs)
    finally:
        agent.close()
    base = statistics.median(times["off"])
    rows = []
    for name, samples in times.items():
        p50 = statistics.median(samples)
        q = np.percentile(samples, [90, 99])
        rows.append({
            "setting": name, "requests": len(samples), "binned": observed[name], "p50_ms": round(p50, 3),
            "p90_ms": round(float(q[0]), 3), "p99_ms": round(float(q[1]), 3),
            "p50_overhead_pct": round((p50 / base - 1) * 100, 2),
        })  # fmt: skip
    notes = [
        f"ResNet-style CNN (cnn.py: width 32, 4 blocks), input 1x3x{args.image}x{args.image} fp32, onnxruntime "
        f"{args.threads} intra-op thread(s), requests through the live slot (LiveModel.infer) as the API runs them",
        f"statistics thread, per binned request (input {3 * args.image * args.image} values subsampled to "
        f"{DriftSettings().max_values}, output 10): {bin_ms:.3f} ms = {bin_ms / base * 100:.2f} % of the off p50",
        f"request thread, per request (the observer's decision and hand-over): {call_us:.1f} µs",
        "settings interleaved over rounds (order reversed every other round); the machine is shared by other jobs",
    ]
    return rows, notes


def _request(agent: DeviceAgent, x: np.ndarray) -> None:
    with agent.live.acquire("cnn") as model:
        model.infer({"input": x})


def _call_us(observer: Any, x: np.ndarray, outputs: dict[str, np.ndarray]) -> float:
    spent = []
    for _ in range(2000):
        start = time.perf_counter()
        observer({"input": x}, outputs)
        spent.append((time.perf_counter() - start) * 1e6)
    observer.owner.flush()
    return statistics.median(spent)


def _binning_ms(observer: Any, x: np.ndarray, outputs: dict[str, np.ndarray]) -> float:
    monitor = observer.monitor
    stats = {**monitor.stats.inputs, **monitor.stats.outputs}
    arrays = {"input": x, **outputs}
    spent = []
    for _ in range(200):
        start = time.perf_counter()
        for name, s in stats.items():
            LiveCounts.of(s, arrays[name], monitor.settings.max_values)
        spent.append((time.perf_counter() - start) * 1000)
    return statistics.median(spent)


if __name__ == "__main__":
    main()
