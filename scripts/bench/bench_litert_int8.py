"""Benchmark: int8 vs fp32 with LiteRT (XNNPACK) on this CPU, on a ResNet-50, and the int8 path to choose.

What it measures, in one run, side by side:

* the ONNX → float TFLite conversion through onnx2tf in the managed toolchain: wall time and peak memory
  (the converter process and its onnxsim children);
* latency (median of single-image inferences, batch 1, through edgepack's LiteRT backend — the agent's
  serving path, int8 models quantizing/dequantizing at the edges) at 1 and 2 threads, 224x224 input;
* error of each int8 model against the float TFLite model (max/mean |diff| of the logits, cosine, top-1
  agreement) and top-1 accuracy on held-out real digits;
* the int8 paths: ai-edge-quantizer static int8 with global MinMax ranges (what the compiler uses), with
  its own default moving-average ranges, and onnx2tf's own full-integer path (TensorFlow's converter,
  per-channel, calibrated on the same samples).

The model is the ResNet-50 trained on scikit-learn's digits (``scripts/models/train_resnet50_digits.py``,
built into ``.cache/bench/`` on first use, as for ``bench_ort_int8.py``), with its input fixed to
1x3x224x224; digits are resized to 224 the way the training script resizes them to 112.

    .venv/bin/python scripts/bench/bench_litert_int8.py            # ~5 minutes on 2 AVX-512 cores (15 on AVX2)
    .venv/bin/python scripts/bench/bench_litert_int8.py --quick    # fewer samples and runs
    .venv/bin/python scripts/bench/bench_litert_int8.py --work DIR # reuse the conversions made in DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))

from bench_ort_int8 import CACHE, _digits_module, ensure_model, to_rgb
from results import add_speedups, write_results

from edgepack.compiler.tflite_convert import ConvertedModel, convert_onnx
from edgepack.compiler.tflite_quantize import quantize_int8
from edgepack.compiler.toolchain import ensure_toolchain
from edgepack.manifest import TensorSpec
from edgepack.runtimes.base import LoadedModel, RuntimeOptions, get_backend

log = logging.getLogger("bench_litert_int8")
SIZE = 224


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=CACHE / "resnet50.onnx")
    parser.add_argument("--quick", action="store_true", help="fewer samples and runs (smoke test)")
    parser.add_argument("--work", type=Path, help="work folder; conversions already in it are reused")
    args = parser.parse_args()

    runs = 8 if args.quick else 30
    n_calib = 16 if args.quick else 64
    n_test = 40 if args.quick else 120
    digits = _digits_module().load_split()
    calib = to_rgb(digits.x_calibration[:n_calib], SIZE)
    test_x = to_rgb(digits.x_test[:n_test], SIZE)

    chain = ensure_toolchain("tflite")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-litert-"))
    work.mkdir(parents=True, exist_ok=True)
    fixed = fixed_shape(ensure_model(args.model), work / "resnet50-224.onnx")
    proto = onnx.load(str(fixed), load_external_data=False)
    inputs = [TensorSpec(name="input", dtype="float32", shape=[1, 3, SIZE, SIZE])]
    outputs = [TensorSpec(name=proto.graph.output[0].name, dtype="float32", shape=[1, 10])]
    feeds = [{"input": calib[i : i + 1]} for i in range(len(calib))]

    converted = conversion(work / "float", "float conversion (what the compiler does)")
    if converted is None:
        converted = convert_onnx(fixed, work / "float", inputs=inputs, outputs=outputs, samples=feeds, toolchain=chain)
        save_conversion(work / "float", converted)
    log.info("float: %.0f s, peak %.0f MB", converted.seconds, converted.peak_rss_mb or 0)
    with_int8 = conversion(work / "o2t-int8", "onnx2tf's own full-integer path (for comparison)")
    if with_int8 is None:
        with_int8 = convert_onnx(
            fixed, work / "o2t-int8", inputs=inputs, outputs=outputs, samples=feeds, toolchain=chain,
            int8_calibration=feeds,
        )  # fmt: skip
        save_conversion(work / "o2t-int8", with_int8)
    assert with_int8.int8_path is not None
    load_after = {
        part: json.loads((work / folder / "conversion.json").read_text()).get("load_after", float("nan"))
        for part, folder in (("float", "float"), ("int8", "o2t-int8"))
    }
    convert_wall, o2t_int8_wall = converted.seconds, with_int8.seconds

    models: dict[str, Path] = {"fp32 (onnx2tf float)": converted.path}
    quant_s: dict[str, float] = {}
    for label, ranges in (
        ("int8 ai-edge-quantizer, MinMax ranges = rpi4/rpi5/arm64 targets", "minmax"),
        ("int8 ai-edge-quantizer, moving-average ranges (its default)", "ema"),
    ):
        path = work / f"aeq-{ranges}.tflite"
        start = time.perf_counter()
        quantize_int8(converted.path, path, calibration=feeds, inputs=converted.inputs, ranges=ranges)
        quant_s[label] = round(time.perf_counter() - start, 1)
        models[label] = path
        log.info("%s in %.1f s", label, quant_s[label])
    models["int8 onnx2tf full-integer (TF converter, per-channel)"] = with_int8.int8_path
    quant_s["int8 onnx2tf full-integer (TF converter, per-channel)"] = round(o2t_int8_wall - convert_wall, 1)  # extra

    specs = (converted.inputs, converted.outputs)
    out_name = converted.outputs[0].name
    latency = {threads: latencies(models, specs, test_x[:1], threads=threads, runs=runs) for threads in (1, 2)}
    reference = logits(models["fp32 (onnx2tf float)"], specs, test_x, out_name)
    rows: list[dict[str, Any]] = []
    for label, path in models.items():
        got = reference if label.startswith("fp32") else logits(path, specs, test_x, out_name)
        diff = np.abs(got - reference)
        cos = np.sum(got * reference, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
        row: dict[str, Any] = {
            "model": label,
            "ms_1t": latency[1][label],
            "ms_2t": latency[2][label],
            "max_abs_diff": round(float(diff.max()), 4),
            "mean_abs_diff": round(float(diff.mean()), 4),
            "cosine_mean": round(float(cos.mean()), 5),
            "top1_agreement": round(100.0 * float(np.mean(got.argmax(1) == reference.argmax(1))), 2),
            "size_mb": round(path.stat().st_size / 1e6, 1),
        }
        if label in quant_s:
            row["quantize_s"] = quant_s[label]
        rows.append(row)
        log.info("%s", row)
    add_speedups(rows)

    import ai_edge_litert

    notes = [
        f"Model: ResNet-50 (bottleneck [3,4,6,3]) trained on sklearn digits at 112x112, input fixed to 1x3x{SIZE}x{SIZE}.",
        f"onnx2tf {converted.toolchain.get('onnx2tf')} (TensorFlow {converted.toolchain.get('tensorflow')}) float "
        f"conversion: {convert_wall:.0f} s, peak memory {converted.peak_rss_mb:.0f} MB (converter process; its "
        f"onnxsim children peak lower); with its int8 path as well: {o2t_int8_wall:.0f} s, peak "
        f"{with_int8.peak_rss_mb:.0f} MB. 1-minute load average when each ended (the converter's own share "
        f"included): {load_after['float']:.1f}, {load_after['int8']:.1f} on {os.cpu_count()} cores.",
        f"LiteRT (ai-edge-litert {ai_edge_litert.__version__ if hasattr(ai_edge_litert, '__version__') else '?'}), "
        f"XNNPACK, through edgepack's LiteRT backend (int8 models quantize/dequantize at the edges); batch 1; "
        f"models measured round-robin, 5 rounds of {max(runs // 5, 3)} runs, best round's median.",
        f"Errors against the float TFLite model on {len(test_x)} held-out digits at {SIZE}x{SIZE}; "
        f"{len(calib)} calibration samples for every int8 path. (Task accuracy is not shown: the model was "
        "trained at 112x112 and is not accurate at 224x224; agreement with fp32 is what int8 must keep.)",
    ]
    md = write_results("litert_int8", rows, title="LiteRT int8 vs fp32 (ResNet-50, XNNPACK, this CPU)", notes=notes)
    print(md.read_text())


def conversion(where: Path, what: str) -> ConvertedModel | None:
    """A conversion saved in ``where`` by an earlier run (``--work``), or None."""
    saved = where / "conversion.json"
    log.info("onnx2tf: %s%s", what, " (reused)" if saved.is_file() else "")
    if not saved.is_file():
        return None
    data = json.loads(saved.read_text())
    return ConvertedModel(
        path=Path(data["path"]),
        inputs=[TensorSpec.model_validate(s) for s in data["inputs"]],
        outputs=[TensorSpec.model_validate(s) for s in data["outputs"]],
        log_path=Path(data["log"]),
        seconds=data["seconds"],
        peak_rss_mb=data["peak_rss_mb"],
        toolchain=data["toolchain"],
        int8_path=Path(data["int8_path"]) if data.get("int8_path") else None,
    )


def save_conversion(where: Path, converted: ConvertedModel) -> None:
    (where / "conversion.json").write_text(
        json.dumps(
            {
                "path": str(converted.path),
                "inputs": [s.model_dump(mode="json") for s in converted.inputs],
                "outputs": [s.model_dump(mode="json") for s in converted.outputs],
                "log": str(converted.log_path),
                "seconds": converted.seconds,
                "peak_rss_mb": converted.peak_rss_mb,
                "load_after": os.getloadavg()[0],
                "toolchain": converted.toolchain,
                "int8_path": str(converted.int8_path) if converted.int8_path else None,
            }
        )
    )


def fixed_shape(model: Path, out: Path) -> Path:
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    proto = onnx.load(str(model))
    make_input_shape_fixed(proto.graph, proto.graph.input[0].name, [1, 3, SIZE, SIZE])
    fix_output_shapes(proto)
    onnx.save(proto, str(out))
    return out


def _load(path: Path, specs: tuple[list[TensorSpec], list[TensorSpec]], threads: int) -> LoadedModel:
    return get_backend("litert").load(path, inputs=specs[0], outputs=specs[1], options=RuntimeOptions(threads=threads))


def logits(path: Path, specs: Any, x: np.ndarray, name: str) -> np.ndarray:
    model = _load(path, specs, threads=2)
    try:
        return np.concatenate([model.infer({"input": x[i : i + 1]})[name] for i in range(len(x))]).astype(np.float64)
    finally:
        model.close()


def latencies(models: dict[str, Path], specs: Any, x: np.ndarray, *, threads: int, runs: int) -> dict[str, float]:
    """Milliseconds per inference of each model, measured interleaved (round-robin, 5 rounds of runs/5
    inferences each) so load from other processes hits every model alike; the best round's median."""
    loaded = {label: _load(path, specs, threads=threads) for label, path in models.items()}
    try:
        for model in loaded.values():
            for _ in range(3):
                model.infer({"input": x})
        medians: dict[str, list[float]] = {label: [] for label in loaded}
        for _ in range(5):
            for label, model in loaded.items():
                times = []
                for _ in range(max(runs // 5, 3)):
                    start = time.perf_counter()
                    model.infer({"input": x})
                    times.append(time.perf_counter() - start)
                medians[label].append(statistics.median(times))
        return {label: round(1000.0 * min(values), 2) for label, values in medians.items()}
    finally:
        for model in loaded.values():
            model.close()


if __name__ == "__main__":
    main()
