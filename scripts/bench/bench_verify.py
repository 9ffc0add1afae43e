"""Benchmark: bundle verification speed against sha256sum, and its memory, side by side in one run.

Goals (issue 2): verifying a 200 MB bundle costs at most 1.3x what `sha256sum` takes on the same file;
peak RSS grows by less than 50 MB while verifying a 500 MB bundle (streaming, constant memory).
Writes scripts/bench/results/verify.json and verify.md; ``bench(quick)`` gives the runner's section.

    .venv/bin/python scripts/bench/bench_verify.py [--sizes-mb 200 500] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgepack.bundle import BundleFile, write_bundle
from edgepack.keys import SigningKey
from edgepack.manifest import RuntimeRequirement, TensorSpec
from edgepack.trust import TrustStore

sys.path.insert(0, str(Path(__file__).parent))
from results import RESULTS, write_results

log = logging.getLogger("bench_verify")

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


def measure(sizes_mb: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=RESULTS) as tmp:  # on disk, not a tmpfs: sha256sum reads the same disk
        root = Path(tmp)
        key = SigningKey.generate()
        key.save(root, "k")
        TrustStore.init(root / "trust", [root / "k.pub"])
        for size in sizes_mb:
            bundle = make_bundle(root, size, key)
            verify_cmd = [sys.executable, "-c", CHILD, str(bundle), str(root / "trust"), "verify"]
            idle_cmd = [sys.executable, "-c", CHILD, str(bundle), str(root / "trust"), "idle"]
            sha, ours, idle = [], [], []
            for _ in range(repeats):  # interleaved, so both see the same machine noise
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
            log.info("%s", rows[-1])
    return rows


TITLE = "Bundle verification vs sha256sum (medians, interleaved runs)"
NOTES = [
    "verify s (net) subtracts the same child's interpreter start and trust-store load (measured alone).",
    "Goals: ratio ≤ 1.3 at 200 MB; peak RSS growth < 50 MB at 500 MB.",
]


def bench(quick: bool) -> dict[str, Any]:
    sizes, repeats = ([50], 3) if quick else ([200, 500], 5)
    rows = measure(sizes, repeats)
    return {
        "title": "Verify: bundle verification against sha256sum",
        "method": (
            f"a signed bundle of {', '.join(map(str, sizes))} MB (random payload) on disk; {repeats} interleaved "
            "runs each of `sha256sum FILE`, a child process verifying it (`verify_bundle` with the trust "
            "store), and the same child without verifying (its start cost); medians"
        ),
        "ratios": [
            {
                "what": f"verify (net) / sha256sum, {r['bundle MB']} MB",
                "value": r["ratio net/sha256sum"],
                "goal": "<= 1.3",
                "met": r["ratio net/sha256sum"] <= 1.3,
            }
            for r in rows
        ],
        "tables": [{"title": TITLE, "rows": rows}],
        "plots": [
            {
                "kind": "bars",
                "file": "verify.png",
                "title": "Verification against sha256sum (median seconds)",
                "ylabel": "seconds",
                "groups": [f"{r['bundle MB']} MB" for r in rows],
                "series": {
                    "sha256sum": [r["sha256sum s"] for r in rows],
                    "edgepack verify (net)": [r["verify s (net)"] for r in rows],
                },
            }
        ],
        "notes": NOTES,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_results("verify", measure(args.sizes_mb, args.repeats), title=TITLE, notes=NOTES)


if __name__ == "__main__":
    main()
