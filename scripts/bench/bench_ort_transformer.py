"""Benchmark: static vs dynamic int8 vs fp32 with onnxruntime on a transformer, and what ``x86`` picks.

The x86 target's int8 is static QDQ; on MatMul-heavy graphs without convolutions the compiler also
builds dynamic int8 (weights int8, activations quantized on the fly) and keeps whichever passes the
accuracy bar and runs faster on this host (``compiler/accuracy_aware.py``). This measures that choice on
a real transformer, in one run, side by side:

* latency (median of single-sample runs, batch 1) of fp32, static int8 (the x86 target's settings),
  static int8 with full 8-bit weights, and dynamic int8, at 1 and 2 intra-op threads;
* top-1 agreement with fp32 and top-1 accuracy on the 360 held-out digits;
* a whole ``edgepack compile --target x86`` of the model: which int8 method it chose, the latencies its
  search measured for each, and the compile time.

Model: a pre-norm ViT (6 blocks, width 256, 4 heads, MLP 1024, 65 tokens) trained on scikit-learn's
digits by ``scripts/models/train_vit_digits.py`` (PyTorch, in /work/venvs/train), built into
``.cache/bench/`` on first use. Results: ``scripts/bench/results/ort_transformer.{json,md}``.

    .venv/bin/python scripts/bench/bench_ort_transformer.py            # ~1 minute, plus ~5 to train the model once
    .venv/bin/python scripts/bench/bench_ort_transformer.py --quick    # fewer runs, for a smoke test
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "bench"))

from results import add_speedups, load_script, write_results  # noqa: E402

CACHE = REPO / ".cache" / "bench"
TRAIN_PYTHON = Path("/work/venvs/train/bin/python")

log = logging.getLogger("bench_ort_transformer")


ORT_BENCH = load_script(REPO / "scripts" / "bench" / "bench_ort_int8.py", "bench_ort_int8")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("edgepack").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=CACHE / "vit_digits.onnx")
    parser.add_argument("--quick", action="store_true", help="fewer runs (smoke test)")
    args = parser.parse_args()

    model = ensure_model(args.model)
    runs = 20 if args.quick else 200
    digits = ORT_BENCH._digits_module().load_split()
    calib = digits.x_calibration[:64]
    test_x, test_y = digits.x_test, digits.y_test

    from edgepack.compiler.quantize_ort import Int8Settings, quantize_int8
    from edgepack.targets.registry import get_target

    work = Path(tempfile.mkdtemp(prefix="bench-transformer-"))
    fp32 = ORT_BENCH.optimized_fp32(model, work, calib)
    x86 = Int8Settings.for_target(get_target("x86"))
    variants = {
        "int8 static QDQ = x86 target settings": x86,
        "int8 static QDQ, full 8-bit weights": Int8Settings(activation_type="uint8", reduce_range=False),
        "int8 dynamic (x86 target's dynamic path)": x86.dynamic(),
    }
    models: dict[str, Path] = {"fp32": fp32}
    quant_seconds: dict[str, float] = {}
    feeds = [{"input": calib[i : i + 1]} for i in range(len(calib))]
    for label, settings in variants.items():
        path = work / f"{len(models)}.onnx"
        start = time.perf_counter()
        quantize_int8(fp32, path, feeds, settings)
        quant_seconds[label] = round(time.perf_counter() - start, 1)
        models[label] = path

    reference = ORT_BENCH.predict(fp32, test_x)
    latencies = ORT_BENCH.latency_table_ms(models, {"seq65": test_x[:1]}, runs)
    rows: list[dict[str, Any]] = []
    for label, path in models.items():
        pred = reference if label == "fp32" else ORT_BENCH.predict(path, test_x)
        row: dict[str, Any] = {
            "model": label,
            "ms_1t": latencies[label]["ms_seq65_1t"],
            "ms_2t": latencies[label]["ms_seq65_2t"],
            "top1_agreement": round(100.0 * float(np.mean(pred == reference)), 2),
            "top1_accuracy": round(100.0 * float(np.mean(pred == test_y)), 2),
            "size_mb": round(path.stat().st_size / 1e6, 2),
        }
        if label in quant_seconds:
            row["quantize_s"] = quant_seconds[label]
        rows.append(row)
        log.info("%s", row)
    add_speedups(rows)

    compiled = ORT_BENCH.compile_per_target(
        model, calib, digits.x_validation, digits.y_validation, work, (("x86", "auto"),), input_shape=[1, 1, 8, 8]
    )[0]
    tries = ", ".join(
        f"{t.get('step')} {t.get('latency_ms', '—')} ms" for a in compiled["attempts"] for t in a.get("tries", [])
    )
    notes = [
        f"onnxruntime {ORT_BENCH.ort.__version__}, onnx {onnx.__version__}",
        "model: pre-norm ViT, 6 blocks, width 256, 4 heads, MLP 1024, 64 patch tokens + class token, trained on "
        f"sklearn digits ({len(onnx.load(str(fp32)).graph.node)} nodes after the compiler's optimize step)",
        f"latency: median of {runs} single-sample runs per model and thread count in two passes, each model in "
        "a session of its own, 3 warm-ups; top-1 on the 360 held-out digits; 64 calibration samples",
        f"edgepack compile --target x86 (auto): chose {compiled['precision']} {compiled['method']} in "
        f"{compiled['compile_s']} s; top-1 agreement {compiled['top1_agreement']}%, accuracy "
        f"{compiled['accuracy_orig_to_compiled']}; its search measured (1 thread): {tries}",
    ]
    md = write_results(
        "ort_transformer", rows, title="onnxruntime int8 on a transformer: static vs dynamic", notes=notes
    )
    print(md.read_text())


def ensure_model(path: Path) -> Path:
    if path.exists():
        return path
    if not TRAIN_PYTHON.exists():
        sys.exit(f"{path} is missing and {TRAIN_PYTHON} (the PyTorch venv that builds it) does not exist")
    log.info("building %s (trains a small ViT on digits, about a minute)", path)
    subprocess.run(
        [str(TRAIN_PYTHON), str(REPO / "scripts" / "models" / "train_vit_digits.py"), "--out", str(path)], check=True
    )
    return path


if __name__ == "__main__":
    main()
