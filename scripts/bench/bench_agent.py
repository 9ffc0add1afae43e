"""Benchmark: the agent's p99 latency while bundles hot-swap, and its resident memory over the runtime's.

Side by side in one run, on a ResNet-style CNN served by an agent in its own process and loaded by a
tritonclient client in this one:
- steady state vs while a new bundle is installed (verify, load, warm up, self-test, switch) every
  ``--swap-every`` seconds: p50/p99 and failed requests (goal: p99 during swaps ≤ 2× steady p99);
- resident memory of the agent with the model loaded and served vs a bare process that only loads the
  same model in onnxruntime and runs it (goal: agent ≤ runtime + 60 MB).
Writes scripts/bench/results/agent.json and agent.md.
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
from pathlib import Path

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
x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
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


def load(url: str, seconds: float, concurrency: int, x: np.ndarray) -> tuple[list[float], int]:
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        client = httpclient.InferenceServerClient(url)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                client.infer("cnn", [inp])
            except Exception:  # counted: the goal is zero
                with lock:
                    failures[0] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, failures[0]


def summary(phase: str, latencies: list[float], failures: int, seconds: float) -> dict[str, object]:
    ms = sorted(v * 1000 for v in latencies)
    return {
        "phase": phase,
        "requests": len(ms),
        "failed": failures,
        "req/s": round(len(ms) / seconds, 1),
        "p50 ms": round(statistics.median(ms), 2),
        "p99 ms": round(ms[int(0.99 * (len(ms) - 1))], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--swap-every", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="runtime intra-op threads in the agent")
    parser.add_argument("--image", type=int, default=64)
    args = parser.parse_args()
    swaps = int(args.seconds / args.swap_every) + 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key = SigningKey.generate()
        key.save(root, "k")
        TrustStore.init(root / "trust", [root / "k.pub"])
        bundles = make_bundles(root, key, swaps + 1, args.image)
        agent = subprocess.Popen(
            [sys.executable, "-c", AGENT, str(root / "state"), str(root / "trust"), str(args.threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            url = json.loads(agent.stdout.readline())["url"]
            agent.stdin.write(f"{bundles[0]}\n")
            agent.stdin.flush()
            agent.stdout.readline()
            x = np.random.default_rng(1).standard_normal((1, 3, args.image, args.image)).astype(np.float32)
            load(url, 2.0, args.concurrency, x)  # warm-up
            steady = summary("steady", *load(url, args.seconds, args.concurrency, x), args.seconds)
            install_times: list[dict[str, float]] = []

            def swapper() -> None:
                for path in bundles[1:]:
                    time.sleep(args.swap_every)
                    agent.stdin.write(f"{path}\n")
                    agent.stdin.flush()
                    install_times.append(json.loads(agent.stdout.readline())["timings"])

            thread = threading.Thread(target=swapper)
            thread.start()
            during = summary("during swaps", *load(url, args.seconds, args.concurrency, x), args.seconds)
            thread.join()
            during["swaps"] = len(install_times)
            agent_rss = psutil.Process(agent.pid).memory_info().rss
        finally:
            agent.kill()
        bare_rss = int(
            subprocess.run(
                [sys.executable, "-c", BARE, str(root / "model.onnx"), str(args.threads)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
    ratio = during["p99 ms"] / steady["p99 ms"]
    memory = {
        "phase": "memory",
        "runtime alone RSS MB": round(bare_rss / 2**20, 1),
        "agent RSS MB": round(agent_rss / 2**20, 1),
        "agent overhead MB": round((agent_rss - bare_rss) / 2**20, 1),
    }
    rows = [steady, during, {"phase": "p99 during / steady", "ratio": round(ratio, 2)}, memory]
    for row in rows:
        print(row)
    mean_install = (
        {k: round(statistics.mean(t[k] for t in install_times), 3) for k in install_times[0]} if install_times else {}
    )
    write_results(
        "agent",
        rows,
        title="Agent: latency during hot swaps, and memory over the runtime's own",
        notes=[
            f"ResNet-style CNN {args.image}x{args.image}, binary tritonclient, concurrency {args.concurrency}, "
            f"agent runtime threads {args.threads}, one install every {args.swap_every}s while loading.",
            f"Mean install step times (s): {mean_install}. Installs run in the agent process and share its 2 cores with inference.",
            "Goals: p99 during swaps ≤ 2× steady p99; 0 failed; agent RSS ≤ runtime alone + 60 MB.",
        ],
    )


if __name__ == "__main__":
    main()
