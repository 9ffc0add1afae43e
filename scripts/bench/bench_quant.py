"""Benchmark: fp32 / fp16 / int8 per runtime — latency at 1 and 2 threads and accuracy on real data — in one run.

Two models, each in every precision the runtime has, built with the compiler's own steps (so the figures are
what a bundle carries):

- the sample model ``models/digits_cnn.onnx`` (a small CNN trained on scikit-learn's real handwritten digits):
  top-1 accuracy on the held-out test split (``scripts/models/digits_data.py``) and latency;
- a ResNet-style CNN (``cnn.resnet_like``, random weights, 64×64): latency, and top-1 agreement with fp32.

Runtimes and precisions:

- onnxruntime (CPUExecutionProvider): fp32; fp16 (``compiler.precision.to_fp16``); int8 (static QDQ with
  the ``x86`` target's settings, ``compiler.quantize_ort``) calibrated on the digits calibration split;
- OpenVINO (CPU): fp32 and fp16 as ``INFERENCE_PRECISION_HINT`` (f32 pinned, else it picks bf16 where the
  CPU has it); int8 by NNCF (``compiler.openvino_quantize``);
- LiteRT (XNNPACK, through edgepack's LiteRT backend — the agent's serving path): fp32 is the LiteRT
  family's float model (``compiler.tflite_convert.convert_onnx``: onnx2tf in the managed ``tflite``
  toolchain, batch fixed to 1); int8 is ``compiler.tflite_quantize.quantize_int8`` (what the
  ``rpi4``/``rpi5``/``arm64`` targets carry) on the same calibration data; fp16 is float16 weights
  (ai-edge-quantizer's ``FLOAT_CASTING``, the standard TFLite fp16 form) — the LiteRT targets compile
  int8 or fp32 only, so that row is for comparison. Without the toolchain (``edgepack toolchain install
  tflite``; a full run installs it, ``--quick`` does not) the table says so.

Latency: median of single-sample runs (batch 1) after warm-up. int8 speed depends on the CPU's int8
instructions (VNNI, AMX, ARM dot-product): the report names them next to the figure.

    .venv/bin/python scripts/bench/bench_quant.py [--quick]    # writes scripts/bench/results/quant.{json,md}
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from cnn import resnet_like  # noqa: E402
from results import load_script, write_results  # noqa: E402

log = logging.getLogger("bench_quant")
DIGITS_MODEL = REPO / "models" / "digits_cnn.onnx"
Runner = Callable[[np.ndarray], np.ndarray]


def _digits() -> Any:
    return load_script(REPO / "scripts" / "models" / "digits_data.py", "digits_data").load_split()


def _ort_runner(path: Path, threads: int) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _ov_runner(path: Path, threads: int, hint: str) -> Runner:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path)) if isinstance(path, Path) else path
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint,
                                                 "PERFORMANCE_HINT": "LATENCY"})  # fmt: skip
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[compiled.output(0)].copy()


def ort_variants(fp32: Path, calib: list[dict[str, np.ndarray]], work: Path) -> dict[str, Callable[[int], Runner]]:
    from edgepack.compiler.precision import to_fp16
    from edgepack.compiler.quantize_ort import Int8Settings, quantize_int8
    from edgepack.targets.registry import get_target

    fp16 = work / f"{fp32.stem}-fp16.onnx"
    onnx.save(to_fp16(onnx.load(str(fp32))), str(fp16))
    int8 = work / f"{fp32.stem}-int8.onnx"
    quantize_int8(fp32, int8, calib, Int8Settings.for_target(get_target("x86")))
    return {name: (lambda t, p=path: _ort_runner(p, t)) for name, path in
            (("fp32", fp32), ("fp16", fp16), ("int8", int8))}  # fmt: skip


def ov_variants(fp32: Path, calib: list[dict[str, np.ndarray]], work: Path) -> dict[str, Callable[[int], Runner]]:
    import openvino as ov

    from edgepack.compiler.openvino_quantize import NncfSettings, quantize

    model = ov.convert_model(str(fp32))
    int8_model = quantize(model, calib, NncfSettings(subset_size=len(calib)))
    int8 = work / f"{fp32.stem}-ov-int8.xml"
    ov.save_model(int8_model, str(int8), compress_to_fp16=False)
    fp = work / f"{fp32.stem}-ov.xml"
    ov.save_model(model, str(fp), compress_to_fp16=False)
    return {"fp32": lambda t: _ov_runner(fp, t, "f32"), "fp16": lambda t: _ov_runner(fp, t, "f16"),
            "int8": lambda t: _ov_runner(int8, t, "f32")}  # fmt: skip


def _batch_one(path: Path, work: Path) -> Path:
    """A copy of the ONNX model with its symbolic dimensions (the batch) fixed to 1: TFLite wants static shapes."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    proto = onnx.load(str(path))
    params = {d.dim_param for v in proto.graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
    for param in params:
        make_dim_param_fixed(proto.graph, param, 1)
    fix_output_shapes(proto)
    out = work / f"{path.stem}-b1.onnx"
    onnx.save(proto, str(out))
    return out


def _fp16_tflite(float_model: Path, out: Path) -> Path:
    """float16 weights (dequantized at load) by ai-edge-quantizer's FLOAT_CASTING: TFLite's fp16 form."""
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    q = quantizer.Quantizer(str(float_model))
    q.update_quantization_recipe(
        regex=".*",
        operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
        algorithm_key=AlgorithmName.FLOAT_CASTING,
        op_config=qtyping.OpQuantizationConfig(
            weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
            compute_precision=qtyping.ComputePrecision.FLOAT,
            explicit_dequantize=True,
        ),
    )
    q.quantize().export_model(str(out), overwrite=True)
    return out


def litert_toolchain(quick: bool) -> Any:
    """The managed ONNX→TFLite toolchain: the installed one, or (full runs only) installed now; None if absent."""
    from edgepack.compiler.toolchain import find_toolchain, install_toolchain

    chain = find_toolchain("tflite")
    if chain is None and not quick:
        log.info("installing the tflite toolchain (minutes)")
        chain = install_toolchain("tflite")
    return chain


def litert_variants(fp32: Path, calib: list[dict[str, np.ndarray]], work: Path,
                    chain: Any) -> dict[str, Callable[[int], Runner]]:  # fmt: skip
    from edgepack.compiler.load import tensor_specs
    from edgepack.compiler.tflite_convert import convert_onnx
    from edgepack.compiler.tflite_quantize import quantize_int8
    from edgepack.runtimes.base import RuntimeOptions, get_backend

    fixed = _batch_one(fp32, work)
    proto = onnx.load(str(fixed))
    started = time.perf_counter()
    converted = convert_onnx(fixed, work / f"{fp32.stem}-litert", inputs=tensor_specs(proto, "input"),
                             outputs=tensor_specs(proto, "output"), samples=calib[:20], toolchain=chain)  # fmt: skip
    log.info("onnx2tf %s: %.1f s", fp32.name, time.perf_counter() - started)
    int8 = work / f"{fp32.stem}-litert-int8.tflite"
    quantize_int8(converted.path, int8, calibration=calib, inputs=converted.inputs)
    fp16 = _fp16_tflite(converted.path, work / f"{fp32.stem}-litert-fp16.tflite")
    name_in, name_out = converted.inputs[0].name, converted.outputs[0].name

    def runner(path: Path, threads: int) -> Runner:
        model = get_backend("litert").load(path, inputs=converted.inputs, outputs=converted.outputs,
                                           options=RuntimeOptions(threads=threads))  # fmt: skip
        return lambda x: model.infer({name_in: x})[name_out]

    return {name: (lambda t, p=path: runner(p, t)) for name, path in
            (("fp32", converted.path), ("fp16", fp16), ("int8", int8))}  # fmt: skip


_PROBE = """
import ctypes, sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter
it = Interpreter(model_path=sys.argv[1], num_threads=1)
it.allocate_tensors()
d = it.get_input_details()[0]
for _ in range(50):
    it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    it.invoke()
perm = ctypes.c_ulong(0)
ctypes.CDLL(None).syscall(158, 0x1022, ctypes.byref(perm))  # arch_prctl(ARCH_GET_XCOMP_PERM)
print(perm.value)
"""


def xnnpack_isa(int8_model: Path) -> str:
    """What LiteRT's XNNPACK has for int8 on this CPU, in words. XNNPACK picks its kernels from the CPU's ISA at
    run time and does not report the choice, so this names the int8 (qs8) GEMM kernels the installed build
    carries and, on x86, whether XNNPACK asked Linux for AMX tile state (it does when it enables its AMX
    kernels) in a fresh process that ran the int8 model."""
    import platform
    import re
    import subprocess

    import ai_edge_litert

    kernels: set[str] = set()
    for lib in Path(ai_edge_litert.__file__).parent.glob("*.so"):
        found = re.findall(rb"xnn_qs8_qc8w_i?gemm_minmax_fp32_ukernel_\w+?__([a-z0-9]+)", lib.read_bytes())
        kernels |= {k.decode() for k in found}
    line = f"LiteRT's XNNPACK carries int8 GEMM kernels for {', '.join(sorted(kernels)) or '?'} and picks one by ISA"
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            out = subprocess.run([sys.executable, "-c", _PROBE, str(int8_model)], capture_output=True, text=True,
                                 timeout=60).stdout.split()  # fmt: skip
            amx = bool(int(out[-1]) & (1 << 18))  # XFEATURE_XTILEDATA
            line += ("; here it enabled its AMX kernels (it asked Linux for AMX tile state)" if amx else
                     "; here it did not ask for AMX tile state (VNNI/AVX-512/AVX2 kernels)")  # fmt: skip
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
            line += "; which one ran here could not be probed"
    return line


def interleaved_ms(runners: dict[str, Runner], x: np.ndarray, runs: int) -> dict[str, float]:
    """Median latency (ms) per runner, the runners called in turn on every pass so drift hits them alike."""
    for run in runners.values():
        for _ in range(3):
            run(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(runs):
        for key, run in runners.items():
            t0 = time.perf_counter()
            run(x)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def compare(runtime: str, model: str, variants: dict[str, Callable[[int], Runner]], xs: np.ndarray,
            ys: np.ndarray | None, runs: int) -> list[dict[str, Any]]:  # fmt: skip
    """One row per precision: latency at 1 and 2 threads (interleaved), top-1 accuracy / agreement with fp32."""
    rows = {p: {"runtime": runtime, "model": model, "precision": p} for p in variants}
    single: dict[str, Runner] = {}
    for threads in (1, 2):
        runners: dict[str, Runner] = {}
        for precision, factory in variants.items():
            if "note" in rows[precision]:
                continue
            try:
                runners[precision] = factory(threads)
                runners[precision](xs[:1])
            except Exception as exc:  # e.g. a precision this CPU plugin refuses
                runners.pop(precision, None)
                rows[precision]["note"] = f"failed: {str(exc).splitlines()[0][:160]}"
        for precision, ms in interleaved_ms(runners, xs[:1], runs).items():
            rows[precision][f"ms {threads} thread{'s' if threads > 1 else ''}"] = round(ms, 4)
        single = single or runners
    predicted = {p: np.array([int(np.argmax(run(xs[i : i + 1]))) for i in range(len(xs))]) for p, run in single.items()}
    for precision, pred in predicted.items():
        if ys is not None:
            rows[precision]["top-1 accuracy %"] = round(100 * float(np.mean(pred == ys)), 2)
        if "fp32" in predicted:
            rows[precision]["top-1 agreement with fp32 %"] = round(100 * float(np.mean(pred == predicted["fp32"])), 2)
    for row in rows.values():
        log.info("%s", row)
    return list(rows.values())


def measure(quick: bool) -> tuple[list[dict[str, Any]], list[str], dict[str, str]]:
    """The rows of the table, notes (LiteRT's int8 ISA) to print beside it, and the LiteRT toolchain's versions."""
    from edgepack.versions import installed_version

    digits = _digits()
    n_calib, n_test, runs = (32, 120, 30) if quick else (128, 360, 200)
    calib_digits = [{"input": digits.x_calibration[i : i + 1]} for i in range(min(n_calib, len(digits.x_calibration)))]
    test_x, test_y = digits.x_test[:n_test], digits.y_test[:n_test]
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    versions: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        work = Path(tmp)
        cnn = resnet_like(work / "resnet_like.onnx", image=64, width=32, blocks=4)
        rng = np.random.default_rng(0)
        cnn_x = rng.standard_normal((16 if quick else 48, 3, 64, 64)).astype(np.float32)
        cnn_calib = [{"input": cnn_x[i : i + 1]} for i in range(8 if quick else 32)]
        subjects = (("digits CNN (real digits)", DIGITS_MODEL, calib_digits, test_x, test_y),
                    ("ResNet-style CNN 64×64", cnn, cnn_calib, cnn_x, None))  # fmt: skip
        makers: list[tuple[str, Callable[..., dict[str, Callable[[int], Runner]]]]] = [
            ("onnxruntime", ort_variants), ("OpenVINO", ov_variants)]  # fmt: skip
        try:
            chain = litert_toolchain(quick)
        except Exception as exc:  # an install that fails (offline) is a row that says so
            chain, why = None, f"the ONNX→TFLite toolchain could not be installed: {exc}"[:200]
        else:
            why = ("not measured: the ONNX→TFLite toolchain (onnx2tf) is not installed and --quick does not "
                   "install it; run `edgepack toolchain install tflite` or a full run")  # fmt: skip
        if chain is not None:
            makers.append(("LiteRT", lambda p, c, w: litert_variants(p, c, w, chain)))
            versions.update({f"tflite toolchain {k}": v for k, v in chain.key_versions().items()
                             if k in ("onnx2tf", "tensorflow")})  # fmt: skip
            versions["ai-edge-quantizer"] = installed_version("ai-edge-quantizer")
        else:
            rows.append({"runtime": "LiteRT", "model": "—", "note": why})
        for runtime, make in makers:
            for model_name, path, calib, xs, ys in subjects:
                try:
                    variants = make(path, calib, work)
                except Exception as exc:  # one runtime's failure is a row that says so, not a lost run
                    rows.append({"runtime": runtime, "model": model_name, "note": f"failed: {exc}"[:200]})
                    continue
                rows += compare(runtime, model_name, variants, xs, ys, runs)
                if runtime == "LiteRT" and not notes:
                    notes.append(xnnpack_isa(work / f"{path.stem}-litert-int8.tflite"))
    for row in rows:  # speedups against the same runtime's and model's fp32 row
        base = next((r for r in rows if r.get("runtime") == row.get("runtime") and r.get("model") == row.get("model")
                     and r.get("precision") == "fp32" and "ms 1 thread" in r), None)  # fmt: skip
        if base and "ms 1 thread" in row and row is not base:
            row["speedup vs fp32 (1 thread)"] = round(base["ms 1 thread"] / row["ms 1 thread"], 2)
    return rows, notes, versions


def bench(quick: bool) -> dict[str, Any]:
    rows, litert_notes, litert_versions = measure(quick)
    timed = [r for r in rows if "ms 1 thread" in r]

    def group(row: dict[str, Any]) -> str:  # a plot label, wrapped so neighbours do not run into each other
        model = row["model"].split(" (")[0].replace(" CNN ", " CNN\n")
        return f"{row['runtime']}\n{model}"

    groups = list(dict.fromkeys(group(r) for r in timed))
    series: dict[str, list[float | None]] = {}
    for precision in ("fp32", "fp16", "int8"):
        series[precision] = [next((r["ms 1 thread"] for r in timed if group(r) == g and r["precision"] == precision),
                                  None) for g in groups]  # fmt: skip
    ratios = [{"what": f"int8 speedup over fp32, {r['runtime']}, {r['model']}, 1 thread",
               "value": r["speedup vs fp32 (1 thread)"], "goal": "(context)", "met": None}
              for r in timed if r["precision"] == "int8" and "speedup vs fp32 (1 thread)" in r]  # fmt: skip
    return {
        "title": "Quantization: fp32 / fp16 / int8 per runtime",
        "method": (
            "models built with the compiler's own steps (fp16: compiler.precision.to_fp16; int8: x86 "
            "target QDQ for onnxruntime, NNCF for OpenVINO, calibrated on real digits / random images; LiteRT: "
            "onnx2tf float model from the managed toolchain, int8 by compiler.tflite_quantize as the rpi4/rpi5/"
            "arm64 targets do, fp16 as float16 weights by ai-edge-quantizer, all run through edgepack's LiteRT "
            "backend with XNNPACK); "
            f"latency: median of {'30' if quick else '200'} single-sample runs after 3 warm-ups, the "
            "precisions of one runtime and model called in turn on every pass, at 1 and 2 threads; accuracy: top-1 on the held-out digits test split; OpenVINO fp32/fp16 pinned with "
            "INFERENCE_PRECISION_HINT"
        ),
        "ratios": ratios,
        "int8_figures": True,
        "versions": litert_versions,  # the report names this CPU's int8 instructions next to the figure
        "tables": [{"title": "Latency and accuracy", "rows": rows}],
        "plots": [
            {
                "kind": "bars",
                "file": "quantization.png",
                "title": "Latency per precision (1 thread, batch 1)",
                "ylabel": "ms (log)",
                "groups": groups,
                "series": series,
                "log": True,
            }
        ],
        "notes": [
            "The digits CNN takes 8×8 inputs: its latency is mostly call overhead, so its int8 gain is small; "
            "the ResNet-style CNN shows the compute-bound gain.",
            "fp16 on a CPU without native fp16 arithmetic is emulated or converted back; expect it slower. "
            "LiteRT's fp16 model keeps float16 weights that XNNPACK turns back to fp32 at load on x86.",
            *litert_notes,
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("edgepack").setLevel(logging.WARNING)
    result = bench(args.quick)
    print(write_results("quant", result["tables"][0]["rows"], title=result["title"],
                        notes=[result["method"], *result["notes"]]))  # fmt: skip


if __name__ == "__main__":
    main()
