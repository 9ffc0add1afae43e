"""Benchmark: the agent's cold start with a cached bundle against the runtime's own session creation, and the
agent's resident memory over a bare runtime process, side by side in one run.

- **agent start → ready**: a fresh agent process on a state directory that already holds a committed
  bundle (the ResNet-style CNN of ``bench_agent``): from ``Popen`` until ``/v2/models/cnn/ready`` answers 200
  (interpreter start, imports, recovery, loading the committed model, API up);
- **bare runtime start → ready**: a fresh process that imports onnxruntime, creates the session on the same
  model file and runs it once (what any server's floor is);
- **session creation alone**: ``ort.InferenceSession`` on that file in this (warm) process;
- **RSS**: the agent after serving a few requests against the bare process after 20 runs (``bench_agent``).

Interleaved repeats (median), so both see the same machine noise. Writes scripts/bench/results/coldstart.{json,md};
``bench(quick)`` gives the runner's section.

    .venv/bin/python scripts/bench/bench_coldstart.py [--repeats 7] [--image 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results import load_script, write_results  # noqa: E402

AGENT_BENCH = load_script(HERE / "bench_agent.py", "bench_agent")

BOOT = r"""
import json, sys
from edgepack.agent.config import load_config
from edgepack.agent.service import DeviceAgent
state, trust, threads = sys.argv[1:4]
agent = DeviceAgent(load_config(None, {"state_dir": state, "trust_dir": trust, "listen": "127.0.0.1:0", "runtime.threads": int(threads)}))
agent.boot()
print(json.dumps({"url": agent.start_api().url}), flush=True)
sys.stdin.read()
"""

BARE_START = r"""
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = int(sys.argv[2]); so.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
size = int(sys.argv[3])
s.run(None, {"input": np.zeros((1, 3, size, size), np.float32)})
print("ready", flush=True)
"""


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{url}/v2/models/cnn/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def agent_start(state: Path, trust: Path, threads: int, timeout: float = 120.0) -> float:
    """Seconds from starting an agent process on ``state`` until its model answers ready."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", BOOT, str(state), str(trust), str(threads)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent exited with {proc.wait()} before its API was up")
        url = json.loads(line)["url"]
        while not _ready(url):
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"agent not ready after {timeout:.0f} s")
            time.sleep(0.005)
        return time.perf_counter() - started
    finally:
        proc.kill()
        proc.wait()


def bare_start(model: Path, threads: int, image: int) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", BARE_START, str(model), str(threads), str(image)], check=True,
                   capture_output=True)  # fmt: skip
    return time.perf_counter() - started


def session_creation(model: Path, threads: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    started = time.perf_counter()
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return time.perf_counter() - started


def measure(repeats: int, image: int, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        installer = AGENT_BENCH.AgentProcess(root, threads)  # installs the bundle once, then leaves the state
        try:
            installed = installer.install(AGENT_BENCH.make_bundles(root, installer.key, 1, image)[0])
        finally:
            installer.kill()
        agent_s, bare_s, session_s = [], [], []
        for _ in range(repeats):  # interleaved
            agent_s.append(agent_start(root / "state", root / "trust", threads))
            bare_s.append(bare_start(root / "model.onnx", threads, image))
            session_s.append(session_creation(root / "model.onnx", threads))
    memory = AGENT_BENCH.memory(image, threads)
    return {"agent_s": agent_s, "bare_s": bare_s, "session_s": session_s, "memory": memory,
            "installed": installed.get("installed")}  # fmt: skip


def _row(what: str, values: list[float]) -> dict[str, Any]:
    return {"what": what, "median s": round(statistics.median(values), 3), "min s": round(min(values), 3),
            "max s": round(max(values), 3), "runs": len(values)}  # fmt: skip


def section(result: dict[str, Any], repeats: int, image: int, threads: int) -> dict[str, Any]:
    agent, bare = statistics.median(result["agent_s"]), statistics.median(result["bare_s"])
    mem = result["memory"]
    return {
        "title": "Cold start and memory",
        "method": (
            f"ResNet-style CNN {image}x{image}, runtime threads {threads}; {repeats} interleaved runs of each "
            "(median): a fresh agent process on a state directory holding the committed bundle, Popen → "
            "/v2/models/cnn/ready; a fresh bare process: import onnxruntime, create the session, run once; "
            "and session creation alone in a warm process. RSS: agent after a second of requests vs the "
            "bare process after 20 runs"
        ),
        "ratios": [
            {
                "what": "agent start→ready / bare runtime process start→ready",
                "value": round(agent / bare, 2),
                "goal": "(context)",
                "met": None,
            },
            {
                "what": "agent RSS − bare runtime RSS (MB)",
                "value": mem["agent over runtime MB"],
                "goal": "<= 60",
                "met": mem["agent over runtime MB"] <= 60,
            },
        ],
        "tables": [
            {
                "title": "Start to ready",
                "rows": [
                    _row("agent, cached bundle (process start → model ready)", result["agent_s"]),
                    _row("bare onnxruntime process (start → session created, one run)", result["bare_s"]),
                    _row("onnxruntime session creation alone (warm process)", result["session_s"]),
                ],
            },
            {"title": "Resident memory", "rows": [mem]},
        ],
        "plots": [
            {
                "kind": "bars",
                "file": "coldstart.png",
                "title": "Start to ready (median of interleaved runs)",
                "ylabel": "seconds",
                "groups": ["agent (cached bundle)", "bare runtime process", "session alone"],
                "series": {"median s": [agent, bare, statistics.median(result["session_s"])]},
            }
        ],
        "notes": [
            "Both process starts include the Python interpreter and imports; the agent's also recovery, "
            "loading the committed model (with its checks) and the HTTP API."
        ],
    }


def bench(quick: bool) -> dict[str, Any]:
    repeats, image, threads = (3, 32, 1) if quick else (7, 64, 1)
    return section(measure(repeats, image, threads), repeats, image, threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    result = section(measure(args.repeats, args.image, args.threads), args.repeats, args.image, args.threads)
    rows = [*result["tables"][0]["rows"], {"what": "memory", **result["tables"][1]["rows"][0]}]
    print(write_results("coldstart", rows, title=result["title"], notes=[result["method"], *result["notes"]]))


if __name__ == "__main__":
    main()
