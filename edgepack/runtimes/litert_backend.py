"""The LiteRT (TensorFlow Lite) backend: runs ``.tflite`` models with ``ai_edge_litert``'s Interpreter.

The interpreter uses its default XNNPACK delegate and ``RuntimeOptions.threads`` threads. Callers see
the manifest's signature, which may differ from the flatbuffer's in two ways the backend bridges:

* quantized tensors: where the model's input or output is int8/uint8/int16 with a scale and zero point
  but the manifest says float, inputs are quantized on the way in and outputs dequantized on the way out;
* layout: where a spec's ``layout`` (e.g. "NCHW") differs from its ``native_layout`` ("NHWC", what the
  converter produced), arrays are transposed to the native layout and back
  (:func:`edgepack.runtimes.tensors.transpose_layout`).

Tensors are matched to the manifest by tensor name or by the name in the model's signature (converters
name tensors ``serving_default_x:0`` and keep ``x`` as the signature key). An Interpreter is not
thread-safe, so calls to one model are serialized by a lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import RuntimeBackendError
from edgepack.manifest import TensorSpec
from edgepack.runtimes.base import LoadedModel, RuntimeBackend, RuntimeOptions
from edgepack.runtimes.tensors import SignatureAdapter, numpy_dtype, reconcile_specs

log = logging.getLogger(__name__)

_QUANTIZED_KINDS = frozenset({"int8", "uint8", "int16"})
_FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of one tensor: ``real = (q - zero_point) * scale``."""

    scale: float
    zero_point: int
    dtype: np.dtype

    def quantize(self, values: np.ndarray) -> np.ndarray:
        info = np.iinfo(self.dtype)
        q = np.round(values.astype(np.float64) / self.scale) + self.zero_point
        return np.clip(q, info.min, info.max).astype(self.dtype)

    def dequantize(self, values: np.ndarray, dtype: np.dtype) -> np.ndarray:
        return ((values.astype(np.float64) - self.zero_point) * self.scale).astype(dtype)


@dataclass(frozen=True)
class _Tensor:
    """One model input or output as the interpreter knows it."""

    index: int
    spec: TensorSpec  # the model's own view: native dtype and layout
    quantization: Quantization | None


class LiteRtBackend(RuntimeBackend):
    """Loads ``.tflite`` files into LiteRT interpreters."""

    name = "litert"
    extra = "agent-litert"
    module = "ai_edge_litert"

    def load(
        self,
        model_path: Path,
        *,
        inputs: Sequence[TensorSpec] = (),
        outputs: Sequence[TensorSpec] = (),
        execution: Mapping[str, Any] | None = None,
        options: RuntimeOptions | None = None,
    ) -> LoadedModel:
        model_path = Path(model_path)
        execution, options = execution or {}, options or RuntimeOptions()
        interpreter = _interpreter(model_path, options.threads)
        wanted = {spec.name for spec in [*inputs, *outputs]}
        aliases = _signature_aliases(interpreter)
        native_in = [_tensor(d, aliases["inputs"], wanted) for d in interpreter.get_input_details()]
        native_out = [_tensor(d, aliases["outputs"], wanted) for d in interpreter.get_output_details()]
        in_specs = _reconcile("input", inputs, native_in, model_path)
        out_specs = _reconcile("output", outputs, native_out, model_path)
        return LiteRtModel(
            interpreter,
            in_specs,
            out_specs,
            {t.spec.name: t for t in native_in},
            {t.spec.name: t for t in native_out},
            threads=options.threads,
        )


class LiteRtModel(LoadedModel):
    """One LiteRT interpreter behind a lock."""

    def __init__(
        self,
        interpreter: Any,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        native_inputs: dict[str, _Tensor],
        native_outputs: dict[str, _Tensor],
        *,
        threads: int | None,
    ) -> None:
        self._interpreter: Any = interpreter
        self.inputs = inputs
        self.outputs = outputs
        self._adapter = SignatureAdapter(inputs, outputs)
        self._in = native_inputs
        self._out = native_outputs
        self._threads = threads
        self._lock = threading.Lock()
        self._shapes = {t.index: tuple(t.spec.shape) for t in native_inputs.values()}
        self._spec_dtypes = {spec.name: numpy_dtype(spec.dtype) for spec in outputs}
        self._delegation = _delegation(interpreter)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: self._encode(name, array) for name, array in self._adapter.to_native(inputs).items()}
        with self._lock:
            raw = self._run(feeds)
        decoded = {name: self._decode(name, array) for name, array in raw.items()}
        return self._adapter.from_native(decoded)

    def close(self) -> None:
        with self._lock:
            self._interpreter = None

    def describe(self) -> dict[str, Any]:
        """``delegate`` is what the loaded graph shows, not what was asked for: ``xnnpack`` when LiteRT's
        default delegate took ops over (``delegate_nodes`` DELEGATE nodes stand for the parts it took, of
        ``model_ops``), ``none`` when every op runs on the builtin kernels, ``unknown`` when the runtime
        does not list its nodes."""
        return {
            "runtime": "litert",
            **self._delegation,
            "threads": self._threads,
            "quantized_inputs": sorted(n for n, t in self._in.items() if _converts(t, self.inputs)),
            "quantized_outputs": sorted(n for n, t in self._out.items() if _converts(t, self.outputs)),
        }

    def _encode(self, name: str, array: np.ndarray) -> np.ndarray:
        tensor = self._in[name]
        if tensor.quantization is not None and array.dtype != tensor.quantization.dtype:
            return tensor.quantization.quantize(array)
        return np.ascontiguousarray(array)

    def _decode(self, name: str, array: np.ndarray) -> np.ndarray:
        tensor = self._out[name]
        wanted = self._spec_dtypes[name]
        if tensor.quantization is not None and wanted != tensor.quantization.dtype:
            return tensor.quantization.dequantize(array, wanted)
        return array

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Set inputs, invoke, read outputs; the caller holds the lock."""
        interpreter = self._interpreter
        if interpreter is None:
            raise RuntimeBackendError("this model has been closed; load it again to run it")
        try:
            self._resize(interpreter, feeds)
            for name, array in feeds.items():
                interpreter.set_tensor(self._in[name].index, array)
            interpreter.invoke()
            return {spec.name: interpreter.get_tensor(self._out[spec.name].index) for spec in self.outputs}
        except (ValueError, RuntimeError) as exc:
            raise RuntimeBackendError(f"LiteRT failed to run the model: {exc}") from exc

    def _resize(self, interpreter: Any, feeds: dict[str, np.ndarray]) -> None:
        """Resize inputs whose dynamic dimensions changed since the last call."""
        changed = False
        for name, array in feeds.items():
            index = self._in[name].index
            if self._shapes[index] != array.shape:
                interpreter.resize_tensor_input(index, list(array.shape), strict=True)
                self._shapes[index] = array.shape
                changed = True
        if changed:
            interpreter.allocate_tensors()


_DELEGATE_OP = "DELEGATE"  # the node a delegate (XNNPACK, LiteRT's default) leaves for the ops it took


def _delegation(interpreter: Any) -> dict[str, Any]:
    """Which delegate runs the graph, from the interpreter's node list.

    The node list is only reachable through ``_get_ops_details`` (private, but present in TF Lite and
    every LiteRT release so far; this is the one place that reads it). Without it: ``unknown``.
    """
    details = getattr(interpreter, "_get_ops_details", None)
    if details is None:
        return {"delegate": "unknown"}
    ops = [op["op_name"] for op in details()]
    delegates = sum(1 for op in ops if op == _DELEGATE_OP)
    # the list keeps the model's own ops after delegation and adds one DELEGATE node per delegated part
    return {
        "delegate": "xnnpack" if delegates else "none",
        "delegate_nodes": delegates,
        "model_ops": len(ops) - delegates,
    }


def _interpreter(model_path: Path, threads: int | None) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    if not model_path.is_file():
        raise RuntimeBackendError(f"model file {model_path} does not exist")
    try:
        interpreter = Interpreter(model_path=str(model_path), num_threads=threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise RuntimeBackendError(f"LiteRT cannot load {model_path.name}: {exc}") from exc
    return interpreter


def _signature_aliases(interpreter: Any) -> dict[str, dict[int, set[str]]]:
    """Tensor index -> the names the model's signature gives it, for inputs and for outputs."""
    aliases: dict[str, dict[int, set[str]]] = {"inputs": {}, "outputs": {}}
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        return aliases  # none, or several whose names could clash: match by tensor name only
    runner = interpreter.get_signature_runner(next(iter(signatures)))
    for role, details in (("inputs", runner.get_input_details()), ("outputs", runner.get_output_details())):
        for key, detail in details.items():
            aliases[role].setdefault(int(detail["index"]), set()).add(key)
    return aliases


def _tensor(detail: Mapping[str, Any], aliases: dict[int, set[str]], wanted: set[str]) -> _Tensor:
    index = int(detail["index"])
    names = {detail["name"], *aliases.get(index, ())}
    matching = sorted(names & wanted)
    name = matching[0] if matching else (sorted(aliases[index])[0] if index in aliases else detail["name"])
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    shape: list[int | str] = [int(d) if d >= 0 else "?" for d in dims]
    dtype = np.dtype(detail["dtype"])
    spec = TensorSpec(name=name, dtype=dtype.name, shape=shape)
    return _Tensor(index=index, spec=spec, quantization=_quantization(detail, dtype, name))


def _quantization(detail: Mapping[str, Any], dtype: np.dtype, name: str) -> Quantization | None:
    if dtype.name not in _QUANTIZED_KINDS:
        return None
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", ()), dtype=np.float64)
    zero_points = np.asarray(params.get("zero_points", ()), dtype=np.int64)
    if scales.size == 0:
        return None
    if scales.size != 1 or zero_points.size != 1:
        log.warning("LiteRT: tensor %r is quantized per channel; edgepack passes it through unconverted", name)
        return None
    return Quantization(scale=float(scales[0]), zero_point=int(zero_points[0]), dtype=dtype)


def _reconcile(role: str, given: Sequence[TensorSpec], native: list[_Tensor], model_path: Path) -> list[TensorSpec]:
    by_name = {t.spec.name: t for t in native}

    def dtype_ok(spec: TensorSpec, model: TensorSpec) -> bool:
        if spec.dtype == model.dtype:
            return True
        tensor = by_name[model.name]
        return tensor.quantization is not None and spec.dtype in _FLOAT_DTYPES

    return reconcile_specs(role, given, [t.spec for t in native], model_path, dtype_ok=dtype_ok)


def _converts(tensor: _Tensor, specs: list[TensorSpec]) -> bool:
    spec = next((s for s in specs if s.name == tensor.spec.name), None)
    return spec is not None and tensor.quantization is not None and spec.dtype != tensor.spec.dtype
