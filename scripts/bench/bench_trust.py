"""Benchmark: what the TUF trust root costs a device — a command signature check, loading the store, and
walking a chain of root versions — so the move to python-tuf's metadata API is a known, small price.

Writes scripts/bench/results/trust.json and trust.md.

    .venv/bin/python scripts/bench/bench_trust.py [--chain 10] [--repeats 2000]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edgepack.keys import SigningKey
from edgepack.protocol import CommandTarget, RollbackCommand, new_command_fields, sign_command, verify_command
from edgepack.trust import TrustStore
from edgepack.trust_root import create, rotate

sys.path.insert(0, str(Path(__file__).parent))
from results import write_results


def per_call_us(fn: Callable[[], object], repeats: int) -> float:
    """Median of 5 batches, µs per call."""
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        batches.append((time.perf_counter() - start) / repeats * 1e6)
    return round(statistics.median(batches), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chain", type=int, default=10, help="Root versions a device walks at once.")
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    roots = [SigningKey.generate() for _ in range(3)]
    ops = SigningKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = {
            "root": [(k.public, f"root{i}") for i, k in enumerate(roots)],
            "bundle": [(SigningKey.generate().public, "release")],
            "command": [(ops.public, "ops")],
        }
        operator = create(work / "op", spec, thresholds={"root": 2}, signers=roots[:2])
        shutil.copytree(operator.directory, work / "dev")
        device = TrustStore.load(work / "dev")
        command = sign_command(
            RollbackCommand(**new_command_fields(CommandTarget(device="d")), action="rollback", model="m"), [ops]
        )
        rows = [
            {"what": "verify a command (1-of-1 Ed25519, role lookup)", "us": per_call_us(lambda: verify_command(command, device), args.repeats)},
            {"what": "load the trust store (parse + shape checks)", "us": per_call_us(lambda: TrustStore.load(work / "dev"), args.repeats // 10)},
        ]  # fmt: skip
        for _ in range(args.chain):
            rotate(operator, roots[:2])
        chain = operator.chain(2)
        timings = []
        for _ in range(5):
            shutil.rmtree(work / "walk", ignore_errors=True)
            shutil.copytree(work / "dev", work / "walk")
            walker = TrustStore.load(work / "walk")
            start = time.perf_counter()
            walker.update(chain)
            timings.append((time.perf_counter() - start) * 1e6)
        rows.append({"what": f"walk {args.chain} root versions (2-of-3 each, old and new), atomic writes",
                     "us": round(statistics.median(timings), 1)})  # fmt: skip
    md = write_results(
        "trust",
        rows,
        title="Trust root (python-tuf metadata) on the device",
        notes=["median of 5 batches; the walk includes an fsync per version file and one for trust.json"],
    )
    print(md.read_text())


if __name__ == "__main__":
    main()
