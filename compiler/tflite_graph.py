"""Reading and rewriting ``.tflite`` flatbuffers in the main environment, without TensorFlow.

Uses the flatbuffer schema that ai-edge-litert ships (``ai_edge_litert.schema_py_generated``). What the
compiler needs from a TFLite model beyond what the interpreter tells:

* :func:`describe` — the model's inputs and outputs (tensor names, signature keys, shapes, dtypes,
  quantization) and its operators (op name, output tensor names), to validate a ``.tflite`` input and to
  know which ops a quantizer touched;
* :func:`rewrite_io` — give inputs and outputs the names of the source model and put the outputs in the
  source order, in the tensor names *and* the signature (onnx2tf names tensors ``serving_default_x:0`` /
  ``PartitionedCall:0`` and may reorder outputs; the runtime backend matches by either name).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import ModelLoadError

TFLITE_IDENTIFIER = b"TFL3"


@dataclass(frozen=True)
class TfliteTensor:
    """A graph input or output of a TFLite model."""

    index: int
    name: str  # tensor name
    key: str | None  # signature key, when the model has one signature
    shape: tuple[int, ...]  # shape_signature: -1 for dynamic dimensions
    dtype: str  # numpy dtype name
    quantized: bool


@dataclass(frozen=True)
class TfliteOp:
    """One operator: its builtin name and the names of the tensors it writes."""

    index: int
    op: str
    outputs: tuple[str, ...]
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class TfliteInfo:
    inputs: list[TfliteTensor]
    outputs: list[TfliteTensor]
    ops: list[TfliteOp]
    signature: str | None
    subgraphs: int

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.op] = counts.get(op.op, 0) + 1
        return dict(sorted(counts.items()))


def schema() -> Any:
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def read_model(path: Path) -> Any:
    """The flatbuffer as the schema's object API (``ModelT``); ModelLoadError if it is not a TFLite file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
        raise ModelLoadError(f"{path} is not a TFLite model (no 'TFL3' flatbuffer identifier)")
    try:
        return schema().ModelT.InitFromPackedBuf(bytearray(data), 0)
    except Exception as exc:  # a corrupt flatbuffer raises anything from struct to IndexError
        raise ModelLoadError(f"{path} is not a readable TFLite flatbuffer: {type(exc).__name__}: {exc}") from exc


def write_model(model: Any, path: Path) -> None:
    import flatbuffers

    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_IDENTIFIER)
    Path(path).write_bytes(bytes(builder.Output()))


def describe(path: Path) -> TfliteInfo:
    """Inputs, outputs and operators of the main subgraph of the model at ``path``."""
    model = read_model(path)
    if not model.subgraphs:
        raise ModelLoadError(f"{path} has no subgraph: it is not a runnable TFLite model")
    graph = model.subgraphs[0]
    s = schema()
    type_names = {v: k for k, v in vars(s.TensorType).items() if not k.startswith("_")}
    op_names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    signature, in_keys, out_keys = _signature_keys(model)

    def tensor(index: int, keys: dict[int, str]) -> TfliteTensor:
        t = graph.tensors[index]
        dims = t.shapeSignature if t.shapeSignature is not None and len(t.shapeSignature) else t.shape
        q = t.quantization
        quantized = q is not None and q.scale is not None and len(q.scale) > 0
        return TfliteTensor(
            index=index,
            name=_text(t.name),
            key=keys.get(index),
            shape=tuple(int(d) for d in (dims if dims is not None else [])),
            dtype=_numpy_dtype(type_names.get(t.type, "UNKNOWN")),
            quantized=quantized,
        )

    ops = []
    for i, op in enumerate(graph.operators or []):
        code = model.operatorCodes[op.opcodeIndex]
        builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        name = op_names.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            name = f"CUSTOM:{_text(code.customCode)}"
        ops.append(
            TfliteOp(
                index=i,
                op=name,
                outputs=tuple(_text(graph.tensors[o].name) for o in (op.outputs if op.outputs is not None else [])),
                inputs=tuple(
                    _text(graph.tensors[o].name) for o in (op.inputs if op.inputs is not None else []) if o >= 0
                ),
            )
        )
    return TfliteInfo(
        inputs=[tensor(int(i), in_keys) for i in graph.inputs],
        outputs=[tensor(int(i), out_keys) for i in graph.outputs],
        ops=ops,
        signature=signature,
        subgraphs=len(model.subgraphs),
    )


def rewrite_io(
    source: Path,
    target: Path,
    *,
    input_names: Mapping[int, str],
    output_names: Mapping[int, str],
    input_order: Sequence[int],
    output_order: Sequence[int],
) -> None:
    """Write ``source`` to ``target`` with graph inputs/outputs renamed (tensor index -> name) and ordered
    as given, in the main subgraph and in its signature (created if the model has none)."""
    model = read_model(source)
    graph = model.subgraphs[0]
    s = schema()
    for index, name in [*input_names.items(), *output_names.items()]:
        graph.tensors[index].name = name
    graph.inputs = np.asarray(list(input_order), dtype=np.int32)
    graph.outputs = np.asarray(list(output_order), dtype=np.int32)

    def tensor_map(index: int, name: str) -> Any:
        m = s.TensorMapT()
        m.name, m.tensorIndex = name, int(index)
        return m

    signature = model.signatureDefs[0] if model.signatureDefs else s.SignatureDefT()
    signature.inputs = [tensor_map(i, input_names[i]) for i in input_order]
    signature.outputs = [tensor_map(i, output_names[i]) for i in output_order]
    if not model.signatureDefs:
        signature.signatureKey, signature.subgraphIndex = "serving_default", 0
    model.signatureDefs = [signature]
    write_model(model, target)


def _signature_keys(model: Any) -> tuple[str | None, dict[int, str], dict[int, str]]:
    sigs = model.signatureDefs or []
    if len(sigs) != 1:
        return None, {}, {}
    sig = sigs[0]
    inputs = {int(m.tensorIndex): _text(m.name) for m in (sig.inputs or [])}
    outputs = {int(m.tensorIndex): _text(m.name) for m in (sig.outputs or [])}
    return _text(sig.signatureKey), inputs, outputs


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _numpy_dtype(type_name: str) -> str:
    mapping = {
        "FLOAT32": "float32",
        "FLOAT16": "float16",
        "FLOAT64": "float64",
        "INT8": "int8",
        "UINT8": "uint8",
        "INT16": "int16",
        "UINT16": "uint16",
        "INT32": "int32",
        "UINT32": "uint32",
        "INT64": "int64",
        "UINT64": "uint64",
        "BOOL": "bool",
        "STRING": "string",
        "BFLOAT16": "bfloat16",
    }
    return mapping.get(type_name, type_name.lower())
