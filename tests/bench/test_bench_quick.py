"""The benchmark runner end to end, quick: it runs real benchmarks in child processes, collects their sections
into results.json and renders the report with its PNG plots, so the scripts do not rot. Figures are never
asserted (benchmarks do not fail on a number); that they exist, are positive and name the machine is.

The subset is the quickest that still goes through every part: the quantization rows (a tiny real model,
two runtimes, one plot) and verify (a bundle on disk against sha256sum, one plot). Serving, swap and the
MLServer peer take minutes and a venv of their own: `scripts/bench/run --quick` runs them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "scripts" / "bench" / "suite.py"


def _suite(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SUITE), *args], cwd=cwd, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="verify's baseline is sha256sum (coreutils)")
def test_quick_run_writes_results_report_and_plots(tmp_path: Path) -> None:
    out, docs = tmp_path / "bench-results", tmp_path / "docs"
    proc = _suite("quantization", "verify", "--quick", "--out", str(out), "--docs", str(docs), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]

    doc = json.loads((out / "results.json").read_text())
    assert doc["quick"] is True
    assert doc["machine"]["cpu"] and doc["machine"]["cores"] >= 1
    assert set(doc["sections"]) == {"quantization", "verify"}
    for name, section in doc["sections"].items():
        assert "error" not in section, (name, section.get("error"), section.get("log_tail"))
        assert section["quick"] is True and section["wall_s"] > 0

    quant = doc["sections"]["quantization"]["tables"][0]["rows"]
    measured = [r for r in quant if "ms 1 thread" in r]
    assert {r["precision"] for r in measured} >= {"fp32", "int8"}
    assert all(r["ms 1 thread"] > 0 and r["ms 2 threads"] > 0 for r in measured)
    digits = [r for r in measured if r["model"].startswith("digits") and r["precision"] == "fp32"]
    assert digits and all(50 < r["top-1 accuracy %"] <= 100 for r in digits)  # a trained model on real digits
    verify = doc["sections"]["verify"]["tables"][0]["rows"]
    assert verify and all(r["sha256sum s"] > 0 and r["verify s (process)"] > 0 for r in verify)

    markdown = (docs / "benchmarks.md").read_text()
    assert doc["machine"]["cpu"] in markdown and "int8 instructions" in markdown
    pngs = sorted((docs / "benchmarks").glob("*.png"))
    assert {p.name for p in pngs} == {"quantization.png", "verify.png"}
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"](benchmarks/{png.name})" in markdown


def test_unknown_benchmark_is_refused_with_the_known_names(tmp_path: Path) -> None:
    proc = _suite("no-such-bench", "--quick", "--out", str(tmp_path / "o"), "--docs", str(tmp_path / "d"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown benchmark(s) no-such-bench" in proc.stderr and "serving" in proc.stderr
    assert not (tmp_path / "d" / "benchmarks.md").exists()
