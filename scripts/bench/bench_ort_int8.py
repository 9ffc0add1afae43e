"""Benchmark: int8 vs fp32 with onnxruntime on this CPU, on a ResNet-50, and compile time per target.

What it measures, in one run, side by side:

* latency (median of single-image inferences, batch 1) of the fp32 model and of int8 variants at 1 and
  2 intra-op threads, at 224x224 (the standard ResNet-50 input) and at the trained 112x112;
* top-1 agreement of each int8 variant with fp32, and top-1 accuracy on held-out real digits;
* the int8 settings that matter on x86 (onnxruntime's default s8 activations vs u8 activations with s8
  weights, with and without reduce_range), so the compiler's choice is a measured one;
* ``edgepack compile`` wall time for x86 (int8), jetson (fp16) and jetson (int8).

The model is the ResNet-50 topology trained on scikit-learn's digits by
``scripts/models/train_resnet50_digits.py`` (PyTorch, in /work/venvs/train); it is built into
``.cache/bench/`` on first use. Results: ``scripts/bench/results/ort_int8.json`` and ``.md``.

    .venv/bin/python scripts/bench/bench_ort_int8.py            # ~2 minutes on 2 AVX-512 cores (10 on AVX2)
    .venv/bin/python scripts/bench/bench_ort_int8.py --quick    # fewer runs, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_speedups, load_script, machine

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "bench"
RESULTS = REPO / "scripts" / "bench" / "results"
TRAIN_PYTHON = Path("/work/venvs/train/bin/python")
TRAINED_SIZE = 112
BENCH_SIZE = 224

log = logging.getLogger("bench_ort_int8")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("edgepack").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=CACHE / "resnet50.onnx")
    parser.add_argument("--quick", action="store_true", help="fewer samples and runs (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    model = ensure_model(args.model)
    runs = 6 if args.quick else 30
    n_calib = 16 if args.quick else 64
    n_test = 60 if args.quick else 360
    digits = _digits_module().load_split()
    calib = to_rgb(digits.x_calibration[:n_calib], TRAINED_SIZE)
    test_x = to_rgb(digits.x_test[:n_test], TRAINED_SIZE)
    test_y = digits.y_test[:n_test]
    test_224 = to_rgb(digits.x_test[: n_test // 3], BENCH_SIZE)

    from edgepack.compiler.quantize_ort import Int8Settings, quantize_int8

    work = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    fp32 = optimized_fp32(model, work, calib)
    variants = {
        "int8 s8/s8 (onnxruntime default types)": Int8Settings(
            activation_type="int8", activation_symmetric=False, reduce_range=False
        ),
        "int8 u8/s8": Int8Settings(activation_type="uint8", reduce_range=False),
        "int8 u8/s8 reduce_range (7-bit weights) = x86 target": Int8Settings(
            activation_type="uint8", reduce_range=True
        ),
        "int8 u8/s8 reduce_range, per-tensor weights": Int8Settings(
            activation_type="uint8", reduce_range=True, per_channel=False
        ),
    }
    models: dict[str, Path] = {"fp32": fp32}
    quant_seconds: dict[str, float] = {}
    feeds = [{"input": calib[i : i + 1]} for i in range(len(calib))]
    for label, settings in variants.items():
        path = work / f"{len(models)}.onnx"
        start = time.perf_counter()
        quantize_int8(fp32, path, feeds, settings, calibration_cache=work / "ranges.json")
        quant_seconds[label] = round(time.perf_counter() - start, 1)
        models[label] = path
        log.info("quantized %s in %.1fs", label, quant_seconds[label])

    reference = {
        TRAINED_SIZE: predict(fp32, test_x),
        BENCH_SIZE: predict(fp32, test_224),
    }
    latencies = latency_table_ms(models, {BENCH_SIZE: test_224[:1], TRAINED_SIZE: test_x[:1]}, runs)
    rows = []
    for label, path in models.items():
        row: dict[str, Any] = {"model": label}
        for size, x in ((TRAINED_SIZE, test_x), (BENCH_SIZE, test_224)):
            pred = reference[size] if label == "fp32" else predict(path, x)
            row[f"top1_agreement_{size}"] = round(100.0 * float(np.mean(pred == reference[size])), 2)
            if size == TRAINED_SIZE:
                row["top1_accuracy_112"] = round(100.0 * float(np.mean(pred == test_y)), 2)
        row.update(latencies[label])
        if label in quant_seconds:
            row["quantize_s"] = quant_seconds[label]
        rows.append(row)
        log.info("%s", row)
    add_speedups(rows)

    compile_times = compile_per_target(fp32 if args.quick else model, calib, test_x, test_y, work)
    result = {
        "host": host_info(),
        "model": {
            "path": str(model.relative_to(REPO)) if model.is_relative_to(REPO) else str(model),
            "topology": "ResNet-50 (bottleneck [3,4,6,3]), trained on sklearn digits at 112x112",
            "nodes_fp32_optimized": len(onnx.load(str(fp32)).graph.node),
        },
        "protocol": {
            "latency": f"median of {runs} single-image runs (batch 1) in two passes, 3 warm-ups per session",
            "calibration_samples": len(calib),
            "test_samples_112": len(test_x),
            "test_samples_224": len(test_224),
            "int8": "static QDQ, per-channel weights, MinMax calibration",
        },
        "rows": rows,
        "compile": compile_times,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort_int8.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "ort_int8.md").write_text(markdown(result))
    print(markdown(result))


# --- model and data ------------------------------------------------------------------------------


def ensure_model(path: Path) -> Path:
    if path.exists():
        return path
    if not TRAIN_PYTHON.exists():
        sys.exit(
            f"{path} is missing and {TRAIN_PYTHON} (the PyTorch venv that builds it) does not exist; create it: "
            "python3 -m venv /work/venvs/train && /work/venvs/train/bin/pip install torch==2.13.0 onnx "
            "onnxscript scikit-learn numpy"
        )
    log.info("building %s (trains a ResNet-50 on digits for up to 15 minutes; 3 on 2 AVX-512 cores)", path)
    subprocess.run(
        [str(TRAIN_PYTHON), str(REPO / "scripts" / "models" / "train_resnet50_digits.py"), "--out", str(path)],
        check=True,
    )
    return path


def _digits_module() -> Any:
    return load_script(REPO / "scripts" / "models" / "digits_data.py", "digits_data")


def to_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """[N, 1, 8, 8] -> [N, 3, size, size] exactly as the training script does it (torch bilinear,
    align_corners=False, no antialias), then (x - 0.5) / 0.25."""
    m = _bilinear_matrix(images.shape[-1], size)
    x = _resize(images, m)
    x = (x - 0.5) / 0.25
    return np.repeat(x, 3, axis=1).astype(np.float32)


def _resize(images: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.einsum("ah,nchw,bw->ncab", m, images.astype(np.float64), m)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for o in range(n_out):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w = src - i0
        m[o, i0] += 1.0 - w
        m[o, i1] += w
    return m


def optimized_fp32(model: Path, work: Path, calib: np.ndarray) -> Path:
    """The fp32 model after the compiler's optimize step (onnxslim), which is what int8 starts from."""
    from edgepack.compiler.node_errors import name_nodes
    from edgepack.compiler.optimize import optimize

    proto = onnx.load(str(model))
    result = optimize(proto, [{"input": calib[:1]}])
    log.info("optimize: %s %d -> %d nodes %s", result.tool, result.nodes_before, result.nodes_after, result.note)
    name_nodes(result.proto)
    out = work / "fp32.onnx"
    onnx.save(result.proto, str(out))
    return out


# --- measuring -----------------------------------------------------------------------------------


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def predict(path: Path, x: np.ndarray) -> np.ndarray:
    s = session(path, 2)
    return np.concatenate([s.run(None, {"input": x[i : i + 1]})[0].argmax(-1) for i in range(len(x))])


def latency_table_ms(
    models: dict[str, Path], inputs: dict[int, np.ndarray] | dict[str, np.ndarray], runs: int
) -> dict[str, dict[str, float]]:
    """Median ms per model, input (keyed by size or a label) and thread count.

    Each model runs in a session of its own that is closed before the next one starts: onnxruntime's
    intra-op threads spin-wait after a run, so interleaving live 2-thread sessions on 2 cores makes them
    steal each other's cores (measured: int8 at 2 threads "slower" than at 1). To even out drift in the
    machine's speed, the whole sweep runs twice and the median is over both passes.
    """
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(2):
        for threads in (1, 2):
            for size, x in inputs.items():
                for label, path in models.items():
                    s = session(path, threads)
                    feed = {"input": x}
                    for _ in range(3):
                        s.run(None, feed)
                    times = samples.setdefault((label, f"ms_{size}_{threads}t"), [])
                    for _ in range(runs // 2):
                        start = time.perf_counter()
                        s.run(None, feed)
                        times.append(time.perf_counter() - start)
                    del s
                log.info("timed %d threads on input %s", threads, size)
    out: dict[str, dict[str, float]] = {label: {} for label in models}
    for (label, key), times in samples.items():
        out[label][key] = round(1000.0 * statistics.median(times), 2)
    return out


ORT_COMPILES: tuple[tuple[str, str], ...] = (("x86", "auto"), ("jetson", "auto"), ("jetson", "int8"))


def compile_per_target(
    model: Path,
    calib: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    work: Path,
    compiles: tuple[tuple[str, str], ...] = ORT_COMPILES,
    input_shape: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Wall time of the whole compile (load .. signed bundle) per (target, precision), with the pipeline's
    own report. Shared by the OpenVINO benchmark, which passes its own targets."""
    from edgepack.compiler.pipeline import CompileRequest, compile_model
    from edgepack.keys import SigningKey

    key = SigningKey.generate()
    calib_file = work / "calib.npz"
    val_file = work / "val.npz"
    np.savez(calib_file, input=calib)
    np.savez(val_file, input=val_x[:100], labels=val_y[:100])
    shape = {"input": input_shape or [1, 3, TRAINED_SIZE, TRAINED_SIZE]}
    out = []
    for target, precision in compiles:
        start = time.perf_counter()
        result = compile_model(
            CompileRequest(
                model=model,
                target=target,
                precision=precision,
                calibration=calib_file,
                validation=val_file,
                keys=[key],
                output=work / f"{target}-{precision}.epk",
                input_shapes=shape,
            )
        )
        seconds = time.perf_counter() - start
        logits = result.accuracy.outputs[0]
        out.append(
            {
                "target": result.target,
                "precision": result.precision,
                "compile_s": round(seconds, 1),
                "top1_agreement": logits.top1_agreement,
                "accuracy": [logits.accuracy_reference, logits.accuracy_compiled],
                "accuracy_orig_to_compiled": f"{logits.accuracy_reference:.2f}% -> {logits.accuracy_compiled:.2f}%",
                "nodes_in_float": len(result.kept_in_float),
                "speedup_1_thread_in_report": (result.speed or {}).get("speedup_1_thread"),
                "method": (result.quantization or {}).get("method"),
                "attempts": result.attempts,
                "steps_s": {k: round(v, 1) for k, v in result.timings.items()},
            }
        )
        log.info("compile %s/%s: %.1fs", target, precision, seconds)
    return out


def host_info() -> dict[str, Any]:
    return {**machine(), "onnxruntime": ort.__version__, "onnx": onnx.__version__}


def markdown(result: dict[str, Any]) -> str:
    h = result["host"]
    lines = [
        "# onnxruntime int8 vs fp32 — ResNet-50",
        "",
        f"Host: {h['cpu']} ({', '.join(h['isa'])}), {h['cores']} cores; onnxruntime {h['onnxruntime']}.",
        f"Model: {result['model']['topology']}. Latency: {result['protocol']['latency']}.",
        "",
        "| model | 224² 1 thread ms | 224² 2 threads ms | speedup 1t / 2t (224²) | 112² 1t / 2t ms "
        "| top-1 agree 112² / 224² | top-1 acc 112² |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        speed = "—" if "speedup_224_1t" not in r else f"{r['speedup_224_1t']}× / {r['speedup_224_2t']}×"
        lines.append(
            f"| {r['model']} | {r['ms_224_1t']} | {r['ms_224_2t']} | {speed} | {r['ms_112_1t']} / {r['ms_112_2t']} "
            f"| {r['top1_agreement_112']}% / {r['top1_agreement_224']}% | {r['top1_accuracy_112']}% |"
        )
    lines += ["", "Compile time per target (whole pipeline, ResNet-50 at 112²):", ""]
    lines += ["| target | precision | compile s | top-1 agree | accuracy orig → compiled | nodes kept float |"]
    lines += ["|---|---|---:|---:|---:|---:|"]
    for c in result["compile"]:
        acc = c["accuracy"]
        lines.append(
            f"| {c['target']} | {c['precision']} | {c['compile_s']} | {c['top1_agreement']}% "
            f"| {acc[0]:.2f}% → {acc[1]:.2f}% | {c['nodes_in_float']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
