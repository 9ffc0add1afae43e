"""int8 TFLite with Google's ai-edge-quantizer, in the main environment, accuracy-aware.

Why ai-edge-quantizer and not onnx2tf's own int8 path: it needs only ai-edge-litert (no TensorFlow, so it
runs in edgepack's environment with the user's calibration data as numpy arrays), it quantizes ``.tflite``
sources too, and its recipes can keep individual ops in float. Measured on a ResNet-50
(``scripts/bench/bench_litert_int8.py``; docs/compiler.md) its int8 was as exact as onnx2tf's (mean
|diff| 0.048 vs 0.050) and as fast (3.3x vs 3.4x over fp32 on an AVX-512 VNNI host), and took 7.5 s
instead of 78 s more inside the toolchain.

Static int8 (``static_wi8_ai8``): per-channel symmetric int8 weights, asymmetric int8 activations,
MinMax ranges from the calibration data, every op the quantizer supports in integer (full-integer when the
model allows; ops it cannot quantize stay float with quantize/dequantize around them, and the report lists
them). The model's inputs and outputs become int8 with one scale each; the manifest keeps them float32 and
the LiteRT backend quantizes/dequantizes at the edges.

The accuracy-aware search (:func:`search_int8`), like the ONNX Runtime family's:

1. quantize everything and let ``evaluate`` (the pipeline's bar) judge it;
2. if it fails, compare every op's output in the int8 model with the float model on calibration samples
   (LiteRT with all intermediate tensors kept) and charge each op with the SQNR it *loses* — its output's
   worst-channel SQNR against the best of its inputs' — then keep the worst tensor in float: its producer
   and its consumers (through reshapes/transposes) get ``no_quantize`` entries in the recipe, since a
   tensor is int8 as soon as its reader is; quantize again (the calibration ranges are reused);
3. one tensor per step, then doubling, until the bar holds, the step budget is spent, or half the ops would be
   float (int8 no longer pays);
4. a candidate LiteRT refuses to run ("Node number 68 (DIV) failed to invoke": its int8 divisor quantized to
   the zero point) costs a step instead of the compile: the op it names, and what feeds it (for DIV the
   divisor), are kept in float; a refusal it cannot place ends the search with
   :class:`~edgepack.errors.ModelRunError`, on which ``auto`` falls back to float.

Usage::

    model = quantize_int8(float_tflite, out, calibration=feeds, inputs=specs)        # one shot
    outcome = search_int8(float_tflite, workdir, calibration=feeds, analysis_feeds=feeds[:16],
                          inputs=specs, evaluate=judge, on_try=print)
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.compiler.accuracy_aware import SEARCH_BUDGET_S, KeptInFloat, keep_mixed_scale_concats
from edgepack.compiler.compare import AccuracyReport
from edgepack.compiler.node_errors import EnergySums
from edgepack.compiler.quantizer_failures import quantizer_failures
from edgepack.compiler.tflite_graph import TfliteInfo, describe
from edgepack.errors import CompileError, ModelRunError, QuantizerError
from edgepack.manifest import TensorSpec
from edgepack.runtimes.tensors import layout_change, transpose_layout
from edgepack.versions import installed_version

log = logging.getLogger(__name__)

Feeds = Sequence[Mapping[str, np.ndarray]]
RECIPE = "static_wi8_ai8"
_IDEAL_INT8_DB = 50.0  # what an 8-bit quantizer keeps at best (6.02 * 8 + 1.76 dB)
# ops that move or reshape data: nothing to keep in float there
_DATA_MOVEMENT = frozenset({"RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS", "QUANTIZE", "DEQUANTIZE"})


@dataclass
class QuantizedModel:
    """An int8 TFLite model and what the quantizer did."""

    path: Path
    kept_float: list[str]  # op output tensor names given a no_quantize recipe entry
    ops_int8: int
    ops_float: dict[str, int]  # op name -> count of ops that still compute in float
    recipe: list[dict[str, Any]]

    @property
    def full_integer(self) -> bool:
        return not self.ops_float


@dataclass
class TfliteInt8Outcome:
    """The int8 model that passed (``model``), or None, and how the search got there."""

    model: QuantizedModel | None
    report: AccuracyReport | None
    kept_in_float: list[KeptInFloat] = field(default_factory=list)
    tries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def nodes_in_float(self) -> list[str]:
        return [n for k in self.kept_in_float for n in k.nodes]


@dataclass(frozen=True)
class OpError:
    """One op's output tensor in the int8 model, how much int8 costs it, and the ops that keep it float."""

    op: str  # builtin op name of the producer
    tensor: str  # its output tensor (the producer's recipe scope)
    sqnr_db: float  # worst channel, against the float model
    loss_db: float  # SQNR lost at this op (ranking key)
    ops: tuple[str, ...]  # producer and consumers (through reshapes/transposes), by output tensor name

    def reason(self) -> str:
        return (
            f"{self.op} output {self.tensor!r} loses {self.loss_db:.1f} dB under int8 "
            f"(worst-channel SQNR {self.sqnr_db:.1f} dB vs the float model)"
        )


class Calibrator:
    """Calibrates a float model once and quantizes it with as many recipes as the search needs.

    ``ranges``: ``"minmax"`` (default) takes each tensor's min and max over all calibration samples, as
    onnxruntime's MinMax does for the other targets; ``"ema"`` is ai-edge-quantizer's own default, a moving
    average (0.95) of per-sample extremes, which clips what only a few samples reach. Measured on one FC
    layer fed N(0, 1) samples one at a time: "ema" cut the input range to +-1.3 and top-1 agreement to 87 %,
    "minmax" kept 99.5 % (max |diff| 0.05 against 3.8).
    """

    def __init__(
        self, float_model: Path, calibration: Feeds, inputs: Sequence[TensorSpec], *, ranges: str = "minmax"
    ) -> None:
        if not calibration:
            raise CompileError("int8 needs calibration samples; none were given")
        if ranges not in ("minmax", "ema"):
            raise CompileError(f"unknown calibration range estimator {ranges!r}: use minmax or ema")
        self.float_model = Path(float_model)
        self.inputs = list(inputs)
        self.ranges = ranges
        self._feeds = [to_native(feed, self.inputs) for feed in calibration]
        self._qsvs: Any = None
        self.signature = describe(self.float_model).signature or "serving_default"

    def quantize(self, out: Path, keep_float: Sequence[str] = ()) -> QuantizedModel:
        with quantizer_failures(f"ai-edge-quantizer {installed_version('ai-edge-quantizer')}"):
            quantizer = self._quantizer(keep_float)
            if self._qsvs is None:
                self._qsvs = self._calibrate()
            with _quiet():
                result = quantizer.quantize(self._qsvs, enable_progress_report=False)
        if result.quantized_model is None:
            raise CompileError(f"ai-edge-quantizer produced no model for {self.float_model.name}")
        out.write_bytes(bytes(result.quantized_model))
        return _summarize(out, list(keep_float), quantizer.get_quantization_recipe())

    def _calibrate(self) -> Any:
        """Quantizer.calibrate, with the range estimator chosen here (it does not expose that)."""

        from ai_edge_quantizer import calibrator, recipe, recipe_manager
        from ai_edge_quantizer.utils import qsv_utils

        manager = recipe_manager.RecipeManager()
        manager.load_quantization_recipe(getattr(recipe, RECIPE)())
        update = qsv_utils.min_max_update if self.ranges == "minmax" else qsv_utils.moving_average_update
        with _quiet():
            calib = calibrator.Calibrator(
                str(self.float_model),
                num_threads=2,
                mode=calibrator.CalibrationMode.CALIBRATION_PRESERVE_ALL_TENSORS,
                qsv_update_func=update,
            )
            calib.calibrate({self.signature: list(self._feeds)}, manager)
        return calib.get_model_qsvs()

    def _quantizer(self, keep_float: Sequence[str]) -> Any:
        from ai_edge_quantizer import qtyping, quantizer, recipe
        from ai_edge_quantizer.algorithm_manager import AlgorithmName

        q = quantizer.Quantizer(self.float_model)
        q.load_quantization_recipe(getattr(recipe, RECIPE)())
        for tensor in keep_float:
            q.update_quantization_recipe(
                regex=f"^{re.escape(tensor)};",  # an op's scope: its output names, each followed by ";"
                operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                algorithm_key=AlgorithmName.NO_QUANTIZE,
            )
        return q


def quantize_int8(
    float_model: Path,
    out: Path,
    *,
    calibration: Feeds,
    inputs: Sequence[TensorSpec],
    keep_float: Sequence[str] = (),
    ranges: str = "minmax",
) -> QuantizedModel:
    """Static int8 of ``float_model`` (feeds in the specs' layout) written to ``out``."""
    return Calibrator(float_model, calibration, inputs, ranges=ranges).quantize(out, keep_float)


def search_int8(
    float_model: Path,
    workdir: Path,
    *,
    calibration: Feeds,
    analysis_feeds: Feeds,
    inputs: Sequence[TensorSpec],
    evaluate: Callable[[Path], AccuracyReport],
    max_steps: int = 8,
    max_float_fraction: float = 0.5,
    on_try: Callable[[str], None] | None = None,
) -> TfliteInt8Outcome:
    """Find an int8 model of ``float_model`` that passes ``evaluate``'s bar; see the module docstring."""
    calibrator = Calibrator(float_model, calibration, inputs)
    structure = describe(float_model)
    candidates = _quantizable_ops(structure)
    kept: list[KeptInFloat] = []
    tries: list[dict[str, Any]] = []
    report: AccuracyReport | None = None
    started = time.monotonic()
    for step in range(max_steps + 1):
        if step > 0 and time.monotonic() - started > SEARCH_BUDGET_S:
            tries[-1]["stopped"] = f"time budget spent ({time.monotonic() - started:.0f} s of {SEARCH_BUDGET_S:.0f} s)"
            log.info("int8: %s", tries[-1]["stopped"])
            break
        keep = [n for k in kept for n in k.nodes]
        path = Path(workdir) / f"int8-step{step}.tflite"
        try:
            model = calibrator.quantize(path, keep)
        except QuantizerError as exc:  # the quantizer refuses one op: keep that op in float, if it names one
            fresh = tuple(o for o in _refused_op(structure, str(exc), candidates) if o not in keep)
            if not fresh or step == max_steps or len(keep) + len(fresh) > max_float_fraction * len(candidates):
                raise  # nothing to keep, or int8 would no longer pay: the caller falls back
            tries.append({"step": step, "nodes_in_float": len(keep), "passed": False, "error": str(exc)[-400:]})
            if on_try:
                on_try(f"int8 step {step}: the quantizer refuses {fresh[0]!r}; keeping it in float")
            kept.append(KeptInFloat(fresh, f"ai-edge-quantizer cannot quantize it: {str(exc)[-200:]}", step + 1))
            continue
        try:
            report = evaluate(path)
        except ModelRunError as exc:  # an int8 kernel refused to run: keep that op in float, if we can tell
            island = _failing_island(float_model, path, str(exc), candidates) if step < max_steps else ()
            tries.append({"step": step, "nodes_in_float": len(keep), "passed": False, "error": str(exc)[-400:]})
            fresh = tuple(o for o in island if o not in keep)
            if not fresh:
                raise
            if on_try:
                on_try(f"int8 step {step}: does not run; keeping {fresh[0]!r} in float")
            kept.append(KeptInFloat(fresh, f"fails to run in int8 on LiteRT: {_kernel_message(str(exc))}", step + 1))
            continue
        tries.append(
            {
                "step": step,
                "nodes_in_float": len(keep),
                "passed": report.passed,
                "summary": report.summary(),
                "ops_float": model.ops_float,
            }
        )
        if on_try:
            on_try(f"int8 step {step}: {len(keep)} op(s) in float, {'passes' if report.passed else 'fails'}")
        if report.passed:
            return TfliteInt8Outcome(model, report, kept, tries)
        if step == max_steps:
            tries[-1]["stopped"] = f"step budget spent ({max_steps} steps)"
            break
        island = lambda output: [n for n in _concat_island(structure, output) if n in candidates]  # noqa: E731
        if keep_mixed_scale_concats(report, island, keep, kept, step):
            continue
        errors = analyse(float_model, path, analysis_feeds, inputs)  # again each step: errors move
        add = 1 if step < 2 else 2 ** (step - 1)
        fresh = [e for e in errors if e.tensor in candidates and not set(e.ops) <= set(keep)][:add]
        grown = set(keep).union(*(e.ops for e in fresh)) & candidates
        if not fresh or len(grown) > max_float_fraction * max(len(candidates), 1):
            tries[-1]["stopped"] = (
                "no quantized op left that the analysis charges with a loss"
                if not fresh
                else f"{len(grown)} of {len(candidates)} quantizable ops would be float; int8 no longer pays"
            )
            break
        for e in fresh:
            kept.append(KeptInFloat(tuple(o for o in e.ops if o not in keep), e.reason(), step + 1))
    return TfliteInt8Outcome(None, report, kept, tries)


_FAILED_NODE = re.compile(r"Node number (\d+) \((\w+)\) failed")
_REFUSED_OP = re.compile(r"for op TFLOperationName\.(\w+) with op id (\d+)")


def _refused_op(info: TfliteInfo, message: str, candidates: set[str]) -> tuple[str, ...]:
    """The op ai-edge-quantizer names in ``message`` ("Failed to quantize bias tensor for op
    TFLOperationName.CONV_2D_TRANSPOSE with op id 241"), by output name, when it is a quantizable op of
    ``info`` of that kind; empty otherwise. (Measured: PP-OCRv4 DBNet's ConvTranspose bias.)"""
    match = _REFUSED_OP.search(message)
    if match is None or int(match.group(2)) >= len(info.ops):
        return ()
    op = info.ops[int(match.group(2))]
    # the quantizer's names are not TFLite's (CONV_2D_TRANSPOSE is TRANSPOSE_CONV): they must share a word
    if not set(op.op.split("_")) & set(match.group(1).split("_")) or not op.outputs or op.outputs[0] not in candidates:
        return ()
    return (op.outputs[0],)


def _failing_island(float_model: Path, int8_model: Path, message: str, candidates: set[str]) -> tuple[str, ...]:
    """The ops to keep in float so the op LiteRT names in ``message`` ("Node number 68 (DIV) failed to
    invoke") runs in float: empty when the message names none, or an op that is not quantizable."""
    match = _FAILED_NODE.search(message)
    ops = describe(int8_model).ops
    if match is None or int(match.group(1)) >= len(ops):
        return ()
    op = ops[int(match.group(1))]
    if op.op != match.group(2) or not op.outputs or op.outputs[0] not in candidates:
        return ()
    # the op and what reads its output, and what feeds it: a kernel refuses an int8 *input* (DIV: a divisor
    # quantized to zero), so the tensors going in stay float too (for DIV the divisor only)
    structure = describe(float_model)
    feeding = next((o.inputs for o in structure.ops if o.outputs and o.outputs[0] == op.outputs[0]), ())
    if op.op == "DIV":
        feeding = feeding[1:]
    island = list(_float_island(structure, op.outputs[0]))
    for tensor in feeding:
        if tensor in candidates:
            island += [o for o in _float_island(structure, tensor) if o not in island]
    return tuple(island)


def _kernel_message(message: str) -> str:
    """The kernel's own complaint ("div.cc:262 data[i] != zero_point was not true. Node number 68 (DIV) ...")."""
    tail = message.rsplit("LiteRT failed to run the model:", 1)[-1].strip()
    return " ".join(tail.split())[:200]


# --- per-op error analysis -------------------------------------------------------------------------


def analyse(float_model: Path, int8_model: Path, feeds: Feeds, inputs: Sequence[TensorSpec]) -> list[OpError]:
    """Ops of ``int8_model`` that int8 hurts, the most harmful first."""
    info = describe(int8_model)
    # streamed: one sample through both models at a time, per-channel energies summed per tensor (channel
    # last), the sample's tensors dropped before the next — never every tensor of every sample at once
    sums: dict[str, EnergySums] = {}
    reference_run, int8_run = _tensor_runner(float_model), _tensor_runner(int8_model)
    for feed in feeds:
        native = to_native(feed, inputs)
        ref, got = reference_run(native), int8_run(native)
        for name, values in got.items():
            if name in ref and ref[name].shape == values.shape and ref[name].dtype.kind == "f":
                sums.setdefault(name, EnergySums(channel_axis=-1)).add(ref[name], values)
        del ref, got
    sqnr = {name: min(acc.scores()[0], 200.0) for name, acc in sums.items()}
    structure = describe(float_model)
    found = []
    for op in info.ops:
        if op.op in _DATA_MOVEMENT or not op.outputs or op.outputs[0] not in sqnr:
            continue
        out_db = sqnr[op.outputs[0]]
        in_db = [min(sqnr[i], _IDEAL_INT8_DB) for i in op.inputs if i in sqnr]
        before = max(in_db) if in_db else _IDEAL_INT8_DB
        found.append(OpError(op.op, op.outputs[0], out_db, before - out_db, _float_island(structure, op.outputs[0])))
    found.sort(key=lambda e: e.loss_db, reverse=True)
    return found


def _concat_island(info: TfliteInfo, output: str) -> tuple[str, ...]:
    """Ops (by output name) that keep graph output ``output``'s CONCATENATION and the tensors it joins in
    float: the concatenation (found through reshapes/transposes, which are named too) and the producers of
    its inputs. Empty when the output is not made by a concatenation."""
    producers = {o: op for op in info.ops for o in op.outputs}
    names: list[str] = []
    op = producers.get(output)
    while op is not None and op.op in _DATA_MOVEMENT and op.inputs:
        names.append(op.outputs[0])
        op = producers.get(op.inputs[0])
    if op is None or op.op != "CONCATENATION":
        return ()
    names.append(op.outputs[0])
    for tensor in op.inputs:
        if tensor in producers and tensor not in names:
            names.append(tensor)
    return tuple(names)


def _float_island(info: TfliteInfo, tensor: str) -> tuple[str, ...]:
    """The ops (by output name) to keep in float so ``tensor`` stays float: its producer and its consumers.

    A tensor is int8 as soon as the op reading it is (the quantizer puts a QUANTIZE in front), so keeping
    only the producer in float changes nothing; reshapes and transposes pass the tensor on unchanged, so
    their consumers count too.
    """
    consumers: dict[str, list[Any]] = {}
    for op in info.ops:
        for name in op.inputs:
            consumers.setdefault(name, []).append(op)
    ops = [tensor]
    frontier = [tensor]
    while frontier:
        for op in consumers.get(frontier.pop(), []):
            if op.outputs and op.outputs[0] not in ops:
                ops.append(op.outputs[0])
                if op.op in _DATA_MOVEMENT:
                    frontier.extend(op.outputs)
    return tuple(ops)


def _tensor_runner(model: Path) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A function: one feed (native layout) -> every tensor of ``model`` for it, dequantized to float."""
    from ai_edge_litert.interpreter import Interpreter

    with _quiet():
        interpreter = Interpreter(model_path=str(model), num_threads=2, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    inputs = {d["name"]: d for d in interpreter.get_input_details()}
    runner_keys = _input_keys(interpreter)
    details = interpreter.get_tensor_details()

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in feed.items():
            detail = inputs.get(name) or inputs.get(runner_keys.get(name, ""))
            if detail is None:
                raise CompileError(f"{model.name} has no input {name!r}")
            interpreter.set_tensor(detail["index"], _encode(array, detail))
        interpreter.invoke()
        values: dict[str, np.ndarray] = {}
        for d in details:
            try:
                value = interpreter.get_tensor(d["index"])
            except ValueError:  # tensors without data (scratch buffers)
                continue
            if value is None or value.size == 0:
                continue
            values[d["name"]] = _decode(value, d)
        return values

    return run


def _input_keys(interpreter: Any) -> dict[str, str]:
    """signature key -> tensor name, for models with one signature."""
    sigs = interpreter.get_signature_list()
    if len(sigs) != 1:
        return {}
    runner = interpreter.get_signature_runner(next(iter(sigs)))
    by_index = {d["index"]: d["name"] for d in interpreter.get_input_details()}
    return {key: by_index.get(d["index"], key) for key, d in runner.get_input_details().items()}


def _encode(array: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind in "iu" and np.asarray(array).dtype.kind == "f":
        scale, zero = detail["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(array / scale) + zero, info.min, info.max).astype(dtype)
    return np.ascontiguousarray(array, dtype=dtype)


def _decode(value: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    if value.dtype.kind not in "iu":
        return np.array(value)
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", ()), dtype=np.float64)
    zeros = np.asarray(params.get("zero_points", ()), dtype=np.float64)
    if scales.size == 0:
        return np.array(value)
    if scales.size == 1:
        return (value.astype(np.float64) - zeros[0]) * scales[0]
    axis = int(params.get("quantized_dimension", 0))
    shape = [1] * value.ndim
    shape[axis] = -1
    return (value.astype(np.float64) - zeros.reshape(shape)) * scales.reshape(shape)


# --- helpers -------------------------------------------------------------------------------------


def to_native(feed: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """``feed`` (in the specs' layout) in the model's native layout, float32."""
    out = {}
    for spec in inputs:
        array = np.asarray(feed[spec.name])
        change = layout_change(spec)
        out[spec.name] = np.ascontiguousarray(transpose_layout(array, *change) if change else array)
    return out


def _quantizable_ops(info: TfliteInfo) -> set[str]:
    return {op.outputs[0] for op in info.ops if op.outputs and op.op not in _DATA_MOVEMENT}


def _summarize(path: Path, kept: list[str], recipe: list[dict[str, Any]]) -> QuantizedModel:
    info = describe(path)
    dtypes = _tensor_dtypes(path)
    ops_float: dict[str, int] = {}
    ops_int8 = 0
    for op in info.ops:
        if op.op in ("QUANTIZE", "DEQUANTIZE") or not op.outputs:
            continue
        if dtypes.get(op.outputs[0], "float32").startswith("float"):
            ops_float[op.op] = ops_float.get(op.op, 0) + 1
        else:
            ops_int8 += 1
    return QuantizedModel(path=path, kept_float=kept, ops_int8=ops_int8, ops_float=ops_float, recipe=recipe)


def _tensor_dtypes(path: Path) -> dict[str, str]:
    from edgepack.compiler.tflite_graph import read_model, schema

    model = read_model(path)
    names = {v: k.lower() for k, v in vars(schema().TensorType).items() if not k.startswith("_")}
    graph = model.subgraphs[0]
    out = {}
    for t in graph.tensors:
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        out[name] = names.get(t.type, "?")
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ai-edge-quantizer prints progress bars and reports to stdout/stderr, and its interpreters warn that
    keeping all tensors is for debugging (calibration needs exactly that): keep both out of the CLI."""
    import warnings

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
        yield
    text = sink.getvalue().strip()
    if text:
        log.debug("ai-edge-quantizer: %s", text[-2000:])
