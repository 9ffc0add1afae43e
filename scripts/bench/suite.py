"""The benchmark runner behind ``scripts/bench/run``: run every benchmark (or the named ones), collect their
sections into ``bench-results/results.json`` and render ``docs/benchmarks.md`` with its plots.

Each benchmark is a module in this folder (runnable on its own, too) exposing ``bench(quick: bool) -> dict``,
a *section*:

    {"title": str, "method": str,                      # what was measured and how
     "tables": [{"title": str, "rows": [dict, ...], "columns": [str, ...] (optional)}],
     "ratios": [{"what": str, "value": float, "goal": str, "met": bool | None}],   # side-by-side ratios
     "plots": [plot spec, see report.py], "notes": [str], "versions": {package: version}}

A benchmark whose setup is missing (no mosquitto, no peer venv) returns a section whose notes say so;
one that raises becomes a section with its error. Nothing here fails on a number: the exit status is 0
unless the runner itself breaks. Every section runs in a child process of its own (a crash or a hang in
one — each has a time limit — leaves the others' figures), with ``EDGEPACK_BENCH_RESULTS`` pointing the
scripts' own results files at ``bench-results/raw/``.

    .venv/bin/python scripts/bench/suite.py [NAMES...] [--quick] [--out bench-results] [--docs docs]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from results import load_script, machine  # noqa: E402

log = logging.getLogger("bench.suite")

# name -> (module file in this folder, time limit in seconds for the full run, for --quick); the limits only
# catch a hang: a whole --quick run took 4.5 minutes on a 2-core machine that others were using too
BENCHMARKS: dict[str, tuple[str, int, int]] = {
    "serving": ("bench_api.py", 1800, 300),
    "swap": ("bench_agent.py", 900, 180),
    "coldstart": ("bench_coldstart.py", 600, 180),
    "quantization": ("bench_quant.py", 1200, 300),
    "delivery": ("bench_delivery.py", 1800, 240),
    "fleet": ("bench_fleet_section.py", 3600, 240),
    "verify": ("bench_verify.py", 900, 180),
    "drift": ("bench_drift_overhead.py", 600, 120),
}


def versions() -> dict[str, str]:
    """Versions of what the figures depend on (edgepack and the runtimes, the load client)."""
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in ("edgepack", "onnxruntime", "openvino", "ai-edge-litert", "numpy", "tritonclient", "orjson",
                 "uvicorn", "paho-mqtt"):  # fmt: skip
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=5).stdout
        out["mosquitto"] = mosquitto.splitlines()[0].split()[-1] if mosquitto else "?"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        pass
    return out


def run_one(name: str, quick: bool) -> dict[str, Any]:
    """The section of benchmark ``name``, computed in this process (the child side of :func:`run_child`)."""
    script, _, _ = BENCHMARKS[name]
    module = load_script(HERE / script, script.removesuffix(".py"))
    return module.bench(quick)


def run_child(name: str, quick: bool, raw_dir: Path) -> dict[str, Any]:
    """Run one benchmark in a child process with its time limit; its section, or one naming what went wrong."""
    _, limit, quick_limit = BENCHMARKS[name]
    timeout = quick_limit if quick else limit
    env = {**os.environ, "EDGEPACK_BENCH_RESULTS": str(raw_dir)}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--section-json", str(out)]
    cmd += ["--quick"] if quick else []
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        wall = round(time.monotonic() - started, 1)
        if proc.returncode == 0 and out.stat().st_size:
            section = json.loads(out.read_text())
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
            section = {"title": name, "error": f"exit {proc.returncode}", "log_tail": tail}
    except subprocess.TimeoutExpired:
        wall = round(time.monotonic() - started, 1)
        section = {"title": name, "error": f"did not finish within its {timeout} s limit"}
    finally:
        out.unlink(missing_ok=True)
    section["wall_s"] = wall
    # what else the machine was doing: the 1-minute load average before and after (cores: machine()["cores"])
    section["host_load_1m"] = f"{load_before:.1f}→{os.getloadavg()[0]:.1f}"
    return section


def _previous_sections(path: Path) -> dict[str, Any]:
    """The sections of an earlier run on this machine, so running a few benchmarks keeps the others' figures
    (each section carries its own time stamp and quick flag; the report shows them)."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if previous.get("machine", {}).get("cpu") != machine()["cpu"]:
        return {}
    return {k: v for k, v in previous.get("sections", {}).items() if k in BENCHMARKS}


def run(names: list[str], quick: bool, out_dir: Path, docs: Path, note: str = "") -> dict[str, Any]:
    import report

    raw_dir = out_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "note": note,
        "machine": machine(),
        "versions": versions(),
        "sections": _previous_sections(out_dir / "results.json"),
    }
    for name in names:
        log.info("running %s%s", name, " (quick)" if quick else "")
        section = run_child(name, quick, raw_dir)
        section.update(when=datetime.now(timezone.utc).isoformat(timespec="seconds"), quick=quick)
        doc["sections"][name] = section
        log.info("%s: %s in %.0f s", name, section.get("error", "done"), section["wall_s"])
        # written after every section, so an interrupted run keeps what it measured
        (out_dir / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = report.write(doc, docs / "benchmarks.md", docs / "benchmarks")
    log.info("wrote %s and %s", out_dir / "results.json", md)
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run (default all: {', '.join(BENCHMARKS)})"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and short windows (< 5 minutes in all)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results", help="where results.json goes")
    parser.add_argument("--docs", type=Path, default=REPO / "docs", help="where benchmarks.md and its plots go")
    parser.add_argument("--note", default="", help="a line for the report's header (e.g. what else ran on the machine)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--section-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("edgepack").setLevel(logging.WARNING)
    if args.child:
        try:
            section = run_one(args.child, args.quick)
        except Exception as exc:  # the section says what broke; the runner goes on with the next benchmark
            section = {"title": args.child, "error": f"{type(exc).__name__}: {exc}",
                       "log_tail": traceback.format_exc().splitlines()[-12:]}  # fmt: skip
        args.section_json.write_text(json.dumps(section, default=str))
        return
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    run(names, args.quick, args.out, args.docs, args.note)


if __name__ == "__main__":
    main()
