"""Benchmark: bundle verification speed against sha256sum, and its memory, side by side in one run.

Goals (issue 2): verifying a 200 MB bundle costs at most 1.3x what `sha256sum` takes on the same file;
peak RSS grows by less than 50 MB while verifying a 500 MB bundle (streaming, constant memory).
Writes scripts/bench/results/verify.json and verify.md.

    .venv/bin/python scripts/bench/bench_verify.py [--sizes-mb 200 500] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgepack.bundle import BundleFile, write_bundle
from edgepack.keys import SigningKey
from edgepack.manifest import RuntimeRequirement, TensorSpec
from edgepack.trust import TrustStore

sys.path.insert(0, str(Path(__file__).parent))
from results import write_results

CHILD = """
import resource, sys
from pathlib import Path
from edgepack.bundle import verify_bundle
from edgepack.trust import TrustStore
trust = TrustStore.load(Path(sys.argv[2]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[3] == "verify":
    verify_bundle(Path(sys.argv[1]), trust)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after)
"""


def make_bundle(root: Path, size_mb: int, key: SigningKey) -> Path:
    payload = root / f"payload-{size_mb}.bin"
    block = os.urandom(1 << 20)
    with open(payload, "wb") as fh:
        for i in range(size_mb):
            fh.write(block[i % 7 :] + block[: i % 7])
    out = root / f"bundle-{size_mb}.epk"
    write_bundle(
        out,
        files=[BundleFile("model.onnx", payload, "model")],
        signers=[key],
        name="bench",
        version="1.0.0",
        target="x86",
        runtime=RuntimeRequirement(name="onnxruntime", version=">=1.18"),
        model_file="model.onnx",
        inputs=[TensorSpec(name="x", dtype="float32", shape=[1])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[1])],
    )
    payload.unlink()
    return out


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent / "results") as tmp:
        root = Path(tmp)
        key = SigningKey.generate()
        key.save(root, "k")
        TrustStore.init(root / "trust", [root / "k.pub"])
        for size in args.sizes_mb:
            bundle = make_bundle(root, size, key)
            verify_cmd = [sys.executable, "-c", CHILD, str(bundle), str(root / "trust"), "verify"]
            idle_cmd = [sys.executable, "-c", CHILD, str(bundle), str(root / "trust"), "idle"]
            sha, ours, idle = [], [], []
            for _ in range(args.repeats):  # interleaved, so both see the same machine noise
                sha.append(timed(["sha256sum", str(bundle)]))
                ours.append(timed(verify_cmd))
                idle.append(timed(idle_cmd))
            rss = subprocess.run(verify_cmd, capture_output=True, text=True, check=True).stdout.split()
            t_sha, t_ours, t_idle = statistics.median(sha), statistics.median(ours), statistics.median(idle)
            rows.append(
                {
                    "bundle MB": size,
                    "sha256sum s": round(t_sha, 3),
                    "verify s (process)": round(t_ours, 3),
                    "interpreter start s": round(t_idle, 3),
                    "verify s (net)": round(t_ours - t_idle, 3),
                    "ratio net/sha256sum": round((t_ours - t_idle) / t_sha, 3),
                    "ratio process/sha256sum": round(t_ours / t_sha, 3),
                    "peak RSS growth MB": round((int(rss[1]) - int(rss[0])) / 1024, 1),
                }
            )
            bundle.unlink()
            print(rows[-1], flush=True)
    write_results(
        "verify",
        rows,
        title="Bundle verification vs sha256sum (medians, interleaved runs)",
        notes=[
            "verify s (net) subtracts the same child's interpreter start and trust-store load (measured alone).",
            "Goals: ratio ≤ 1.3 at 200 MB; peak RSS growth < 50 MB at 500 MB.",
        ],
    )


if __name__ == "__main__":
    main()
