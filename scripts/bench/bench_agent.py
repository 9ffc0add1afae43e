"""Benchmark: the agent's p99 latency while bundles hot-swap, and its resident memory over the runtime's.

Side by side in one run, on a ResNet-style CNN served by an agent in its own process and loaded by a
tritonclient client in this one:
- one continuous load across ``--swaps`` (10) hot swaps (verify, load, warm up, self-test, switch):
  the latency timeline, failed requests (goal 0), and p99 of the requests inside the swap windows
  against the requests outside them (goal ≤ 1.5×);
- resident memory of the agent with the model loaded and served vs a bare process that only loads the
  same model in onnxruntime and runs it (goal: agent ≤ runtime + 60 MB).
Writes scripts/bench/results/agent.json and agent.md; ``bench(quick)`` gives the runner's section (the
memory row is in ``bench_coldstart``'s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil
import tritonclient.http as httpclient

sys.path.insert(0, str(Path(__file__).parent))
from cnn import resnet_like
from results import write_results

from edgepack.bundle import BundleFile, write_bundle
from edgepack.keys import SigningKey
from edgepack.manifest import RuntimeRequirement, SelfTest, TensorSpec
from edgepack.selftest import write_vectors
from edgepack.trust import TrustStore

AGENT = r"""
import json, sys
from pathlib import Path
from edgepack.agent.config import load_config
from edgepack.agent.service import DeviceAgent
state, trust, threads = sys.argv[1:4]
agent = DeviceAgent(load_config(None, {"state_dir": state, "trust_dir": trust, "listen": "127.0.0.1:0", "runtime.threads": int(threads)}))
agent.boot()
handle = agent.start_api()
print(json.dumps({"url": handle.url}), flush=True)
for line in sys.stdin:
    result = agent.install(Path(line.strip()))
    print(json.dumps({"installed": result.version, "timings": result.timings}), flush=True)
"""

BARE = r"""
import sys, numpy as np, onnxruntime as ort, psutil
so = ort.SessionOptions(); so.intra_op_num_threads = int(sys.argv[2]); so.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
size = int(sys.argv[3]) if len(sys.argv) > 3 else 64
x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
for _ in range(20):
    s.run(None, {"input": x})
print(psutil.Process().memory_info().rss)
"""


def make_bundles(root: Path, key: SigningKey, count: int, image: int) -> list[Path]:
    model = resnet_like(root / "model.onnx", image=image)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    inputs = [{"input": rng.standard_normal((1, 3, image, image)).astype(np.float32)} for _ in range(2)]
    outputs = [{"logits": session.run(None, feed)[0]} for feed in inputs]
    write_vectors(root / "selftest.npz", inputs, outputs)
    bundles = []
    for i in range(count):
        out = root / f"cnn-{i}.epk"
        write_bundle(
            out,
            files=[
                BundleFile("model.onnx", model, "model"),
                BundleFile("selftest.npz", root / "selftest.npz", "selftest"),
            ],
            signers=[key],
            name="cnn",
            version=f"1.0.{i}",
            target="x86",
            runtime=RuntimeRequirement(name="onnxruntime", version=">=1.16"),
            model_file="model.onnx",
            inputs=[TensorSpec(name="input", dtype="float32", shape=[1, 3, image, image])],
            outputs=[TensorSpec(name="logits", dtype="float32", shape=[1, 10])],
            selftest=SelfTest(vectors="selftest.npz", atol=1e-3, rtol=1e-3, samples=2),
        )
        bundles.append(out)
    return bundles


def load(
    url: str, seconds: float, concurrency: int, x: np.ndarray, origin: float | None = None
) -> tuple[list[tuple[float, float]], list[float]]:
    """Binary tritonclient requests from ``concurrency`` threads for ``seconds`` (body encoded once per
    thread): (start time since ``origin``, latency s) per answered request, and the start times of failed ones."""
    origin = time.perf_counter() if origin is None else origin
    answered: list[tuple[float, float]] = []
    failed: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        client = httpclient.InferenceServerClient(url)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        while (start := time.perf_counter()) < deadline:
            try:
                client.infer("cnn", [inp])
            except Exception:  # counted: the goal is zero
                with lock:
                    failed.append(start - origin)
                continue
            with lock:
                answered.append((start - origin, time.perf_counter() - start))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answered, failed


def summary(phase: str, latencies: list[float], failures: int, seconds: float) -> dict[str, object]:
    ms = sorted(v * 1000 for v in latencies)
    return {
        "phase": phase,
        "requests": len(ms),
        "failed": failures,
        "req/s": round(len(ms) / seconds, 1) if seconds else None,
        "p50 ms": round(statistics.median(ms), 2) if ms else None,
        "p99 ms": round(ms[int(0.99 * (len(ms) - 1))], 2) if ms else None,
    }


class AgentProcess:
    """An agent in its own process (``AGENT`` above) on a fresh state directory under ``root`` with a new
    signing key trusted: ``url`` is its API, ``install(bundle)`` installs through it and returns the result."""

    def __init__(self, root: Path, threads: int) -> None:
        self.key = SigningKey.generate()
        self.key.save(root, "k")
        TrustStore.init(root / "trust", [root / "k.pub"])
        self.root = root
        self.proc = subprocess.Popen(
            [sys.executable, "-c", AGENT, str(root / "state"), str(root / "trust"), str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.url = json.loads(self.proc.stdout.readline())["url"]

    def install(self, bundle: Path) -> dict[str, Any]:
        self.proc.stdin.write(f"{bundle}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class SwapRun:
    swaps: int = 10
    swap_every: float = 1.5
    steady: float = 3.0  # seconds of load before the first swap and after the last
    concurrency: int = 2
    threads: int = 1
    image: int = 64


def swap_under_load(cfg: SwapRun) -> dict[str, Any]:
    """One continuous load across ``cfg.swaps`` hot swaps: the timeline, the swap windows (install sent →
    result read), failures, and latency inside the windows against outside them."""
    with tempfile.TemporaryDirectory() as tmp:
        agent = AgentProcess(Path(tmp), cfg.threads)
        try:
            bundles = make_bundles(agent.root, agent.key, cfg.swaps + 1, cfg.image)
            url = agent.url
            agent.install(bundles[0])
            x = np.random.default_rng(1).standard_normal((1, 3, cfg.image, cfg.image)).astype(np.float32)
            load(url, 1.0, cfg.concurrency, x)  # warm-up
            windows: list[tuple[float, float]] = []
            install_times: list[dict[str, float]] = []
            origin = time.perf_counter()

            def swapper() -> None:
                time.sleep(cfg.steady)
                for path in bundles[1:]:
                    began = time.perf_counter() - origin
                    install_times.append(agent.install(path)["timings"])
                    windows.append((began, time.perf_counter() - origin))
                    time.sleep(max(0.0, cfg.swap_every - (windows[-1][1] - began)))

            thread = threading.Thread(target=swapper)
            thread.start()
            total = cfg.steady * 2 + cfg.swaps * cfg.swap_every
            answered, failed = load(url, total, cfg.concurrency, x, origin)
            thread.join()
        finally:
            agent.kill()
    inside = [lat for t, lat in answered if any(a <= t + lat and t <= b for a, b in windows)]
    outside = [lat for t, lat in answered if not any(a <= t + lat and t <= b for a, b in windows)]
    window_s = sum(b - a for a, b in windows)
    return {"answered": answered, "failed": failed, "windows": windows, "install_times": install_times,
            "steady": summary("outside swap windows", outside, 0, total - window_s),
            "swapping": summary("inside swap windows", inside, 0, window_s), "total_s": total}  # fmt: skip


def memory(image: int, threads: int) -> dict[str, Any]:
    """RSS of an agent serving the CNN (after a few requests) against a bare process running the same model."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        agent = AgentProcess(root, threads)
        try:
            agent.install(make_bundles(root, agent.key, 1, image)[0])
            x = np.random.default_rng(1).standard_normal((1, 3, image, image)).astype(np.float32)
            load(agent.url, 1.0, 1, x)
            agent_rss = psutil.Process(agent.proc.pid).memory_info().rss
        finally:
            agent.kill()
        bare = subprocess.run([sys.executable, "-c", BARE, str(root / "model.onnx"), str(threads), str(image)],
                              capture_output=True, text=True, check=True)  # fmt: skip
    bare_rss = int(bare.stdout)
    return {"runtime alone RSS MB": round(bare_rss / 2**20, 1), "agent RSS MB": round(agent_rss / 2**20, 1),
            "agent over runtime MB": round((agent_rss - bare_rss) / 2**20, 1)}  # fmt: skip


def section(cfg: SwapRun, result: dict[str, Any]) -> dict[str, Any]:
    steady, swapping = result["steady"], result["swapping"]
    ratio = swapping["p99 ms"] / steady["p99 ms"] if swapping["p99 ms"] and steady["p99 ms"] else None
    failed = len(result["failed"])
    mean_install = (
        {k: round(statistics.mean(t[k] for t in result["install_times"]), 3) for k in result["install_times"][0]}
        if result["install_times"] else {}
    )  # fmt: skip
    answered = result["answered"]
    return {
        "title": "Hot swap under load",
        "method": (
            f"ResNet-style CNN {cfg.image}x{cfg.image} served by an agent process (runtime threads "
            f"{cfg.threads}); {cfg.concurrency} client threads of binary tritonclient requests for "
            f"{result['total_s']:.0f} s without pause; {cfg.swaps} signed bundles installed one after another "
            f"(~every {cfg.swap_every} s) after {cfg.steady} s of steady load; a swap window runs from "
            "sending the install to its result (verify, load, warm-up, self-test, switch); a request is "
            "'inside' when it overlaps a window"
        ),
        "ratios": [
            {
                "what": "p99 inside swap windows / p99 outside",
                "value": round(ratio, 2) if ratio else None,
                "goal": "<= 1.5",
                "met": ratio <= 1.5 if ratio else None,
            },
            {"what": "failed requests across the swaps", "value": failed, "goal": "0", "met": failed == 0},
        ],
        "tables": [
            {
                "title": "Latency inside and outside the swap windows",
                "rows": [steady, swapping, {"phase": "swaps", "requests": len(result["windows"]), "failed": failed}],
            }
        ],
        "plots": [
            {
                "kind": "timeline",
                "file": "swap_timeline.png",
                "title": f"Request latency across {len(result['windows'])} hot swaps (continuous load)",
                "t": [round(t, 4) for t, _ in answered],
                "ms": [round(lat * 1e3, 3) for _, lat in answered],
                "spans": [[round(a, 3), round(b, 3)] for a, b in result["windows"]],
                "failed_t": [round(t, 3) for t in result["failed"]],
            }
        ],
        "notes": [
            f"Mean install step times (s): {mean_install}. Installs run in the agent process and share its "
            "cores with inference (and with the load client here)."
        ],
    }


def bench(quick: bool) -> dict[str, Any]:
    cfg = SwapRun(swap_every=0.8, steady=1.5, image=32) if quick else SwapRun()
    return section(cfg, swap_under_load(cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--swap-every", type=float, default=1.5)
    parser.add_argument("--steady", type=float, default=3.0, help="seconds of load before the first swap and after")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="runtime intra-op threads in the agent")
    parser.add_argument("--image", type=int, default=64)
    args = parser.parse_args()
    cfg = SwapRun(args.swaps, args.swap_every, args.steady, args.concurrency, args.threads, args.image)
    result = section(cfg, swap_under_load(cfg))
    rows = result["tables"][0]["rows"] + [{"phase": r["what"], "ratio": r["value"]} for r in result["ratios"]]
    rows.append({"phase": "memory", **memory(args.image, args.threads)})
    for row in rows:
        print(row)
    write_results("agent", rows, title="Agent: latency during hot swaps, and memory over the runtime's own",
                  notes=[result["method"], *result["notes"],
                         "Goals: p99 inside swap windows ≤ 1.5× outside; 0 failed; agent RSS ≤ runtime alone + 60 MB."])  # fmt: skip


if __name__ == "__main__":
    main()
