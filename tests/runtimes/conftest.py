"""Tiny models built on the spot for the runtime backend tests, with numpy references.

* ``conv_onnx``: Conv(3x3, 4 filters) + Relu + Flatten + Gemm(10), input ``input`` float32
  ``["batch", 1, 8, 8]``, output ``logits`` ``["batch", 10]``;
* ``.tflite`` files written with the flatbuffer schema that ai-edge-litert ships
  (``ai_edge_litert.schema_py_generated``), so no TensorFlow is needed: a float fully-connected model
  with a signature, the same model quantized to int8, and a per-channel add in NHWC.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepack.manifest import TensorSpec

RNG_SEED = 1234


# --- ONNX ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvWeights:
    conv_w: np.ndarray  # [4, 1, 3, 3]
    conv_b: np.ndarray  # [4]
    fc_w: np.ndarray  # [256, 10]
    fc_b: np.ndarray  # [10]

    def reference(self, x: np.ndarray) -> np.ndarray:
        """What the ONNX graph computes, in float64 numpy."""
        padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # [n,1,8,8,3,3]
        conv = np.einsum("nchwij,fcij->nfhw", windows, self.conv_w) + self.conv_b[None, :, None, None]
        hidden = np.maximum(conv, 0.0).reshape(x.shape[0], -1)
        return hidden @ self.fc_w + self.fc_b


@dataclass(frozen=True)
class OnnxModel:
    path: Path
    weights: ConvWeights
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def build_conv_onnx(path: Path) -> OnnxModel:
    from onnx import TensorProto, helper, numpy_helper, save_model

    rng = np.random.default_rng(RNG_SEED)
    weights = ConvWeights(
        conv_w=rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32),
        conv_b=rng.normal(0, 0.1, 4).astype(np.float32),
        fc_w=rng.normal(0, 0.1, (256, 10)).astype(np.float32),
        fc_b=rng.normal(0, 0.1, 10).astype(np.float32),
    )
    inits = [
        numpy_helper.from_array(weights.conv_w, "conv_w"),
        numpy_helper.from_array(weights.conv_b, "conv_b"),
        numpy_helper.from_array(weights.fc_w, "fc_w"),
        numpy_helper.from_array(weights.fc_b, "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Flatten", ["relu"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_relu_gemm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    save_model(model, str(path))
    return OnnxModel(
        path=path,
        weights=weights,
        inputs=[TensorSpec(name="input", dtype="float32", shape=["batch", 1, 8, 8], layout="NCHW")],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", 10])],
    )


@pytest.fixture(scope="session")
def conv_onnx(tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    pytest.importorskip("onnx", reason="the onnx package builds the test model")
    return build_conv_onnx(tmp_path_factory.mktemp("onnx") / "conv.onnx")


# --- TFLite -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TfliteModel:
    path: Path
    weights: dict[str, np.ndarray]


def _schema() -> Any:
    schema = pytest.importorskip(
        "ai_edge_litert.schema_py_generated", reason="ai-edge-litert ships the TFLite flatbuffer schema"
    )
    return schema


def _quant(schema: Any, scale: float, zero_point: int) -> Any:
    q = schema.QuantizationParametersT()
    q.scale = [scale]
    q.zeroPoint = [zero_point]
    return q


def _tensor(schema: Any, name: str, shape: list[int], ttype: int, buffer: int, quant: Any | None = None) -> Any:
    t = schema.TensorT()
    t.name, t.shape, t.type, t.buffer, t.quantization = name, shape, ttype, buffer, quant
    return t


def _buffer(schema: Any, data: np.ndarray | None = None) -> Any:
    b = schema.BufferT()
    b.data = None if data is None else np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
    return b


def _opcode(schema: Any, code: int) -> Any:
    op = schema.OperatorCodeT()
    op.builtinCode = op.deprecatedBuiltinCode = code
    op.version = 1
    return op


def _operator(schema: Any, inputs: list[int], outputs: list[int], options_type: int, options: Any) -> Any:
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, inputs, outputs
    op.builtinOptionsType, op.builtinOptions = options_type, options
    return op


def _write(
    schema: Any, path: Path, tensors: list[Any], buffers: list[Any], op: Any, code: int, sig: Any | None
) -> None:
    import flatbuffers

    subgraph = schema.SubGraphT()
    subgraph.tensors, subgraph.inputs, subgraph.outputs, subgraph.operators = tensors, [0], [len(tensors) - 1], [op]
    model = schema.ModelT()
    model.version = 3
    model.operatorCodes = [_opcode(schema, code)]
    model.subgraphs = [subgraph]
    model.buffers = buffers
    model.description = "edgepack test model"
    model.signatureDefs = [sig] if sig is not None else None
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))


def _signature(schema: Any, inputs: dict[str, int], outputs: dict[str, int]) -> Any:
    def tensor_map(name: str, index: int) -> Any:
        m = schema.TensorMapT()
        m.name, m.tensorIndex = name, index
        return m

    sig = schema.SignatureDefT()
    sig.inputs = [tensor_map(n, i) for n, i in inputs.items()]
    sig.outputs = [tensor_map(n, i) for n, i in outputs.items()]
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    return sig


def build_fc_tflite(path: Path) -> TfliteModel:
    """float32 x[1, 8] -> FullyConnected -> y[1, 4]; tensors named like a converter names them."""
    schema = _schema()
    rng = np.random.default_rng(RNG_SEED)
    w = rng.normal(0, 0.5, (4, 8)).astype(np.float32)
    b = rng.normal(0, 0.1, 4).astype(np.float32)
    f32 = schema.TensorType.FLOAT32
    tensors = [
        _tensor(schema, "serving_default_x:0", [1, 8], f32, 0),
        _tensor(schema, "dense/weights", [4, 8], f32, 1),
        _tensor(schema, "dense/bias", [4], f32, 2),
        _tensor(schema, "StatefulPartitionedCall:0", [1, 4], f32, 0),
    ]
    buffers = [_buffer(schema), _buffer(schema, w), _buffer(schema, b)]
    op = _operator(schema, [0, 1, 2], [3], schema.BuiltinOptions.FullyConnectedOptions, schema.FullyConnectedOptionsT())
    sig = _signature(schema, {"x": 0}, {"y": 3})
    _write(schema, path, tensors, buffers, op, schema.BuiltinOperator.FULLY_CONNECTED, sig)
    return TfliteModel(path=path, weights={"w": w, "b": b})


# int8 quantization of the quantized FC model: real = (q - zero_point) * scale
Q_IN = (0.02, -3)
Q_W = 0.01
Q_OUT = (0.05, 4)


def build_int8_fc_tflite(path: Path) -> TfliteModel:
    """int8 x[1, 8] -> FullyConnected (int8 weights, int32 bias) -> int8 y[1, 4]."""
    schema = _schema()
    rng = np.random.default_rng(RNG_SEED + 1)
    w_q = rng.integers(-100, 100, (4, 8)).astype(np.int8)
    b_q = rng.integers(-500, 500, 4).astype(np.int32)
    i8, i32 = schema.TensorType.INT8, schema.TensorType.INT32
    tensors = [
        _tensor(schema, "x", [1, 8], i8, 0, _quant(schema, *Q_IN)),
        _tensor(schema, "w", [4, 8], i8, 1, _quant(schema, Q_W, 0)),
        _tensor(schema, "b", [4], i32, 2, _quant(schema, Q_IN[0] * Q_W, 0)),
        _tensor(schema, "y", [1, 4], i8, 0, _quant(schema, *Q_OUT)),
    ]
    buffers = [_buffer(schema), _buffer(schema, w_q), _buffer(schema, b_q)]
    op = _operator(schema, [0, 1, 2], [3], schema.BuiltinOptions.FullyConnectedOptions, schema.FullyConnectedOptionsT())
    _write(schema, path, tensors, buffers, op, schema.BuiltinOperator.FULLY_CONNECTED, None)
    return TfliteModel(path=path, weights={"w": w_q.astype(np.float64) * Q_W, "b": b_q * (Q_IN[0] * Q_W)})


def build_nhwc_add_tflite(path: Path) -> TfliteModel:
    """float32 x[1, 4, 4, 3] (NHWC) + a per-channel constant[3] -> y[1, 4, 4, 3]."""
    schema = _schema()
    bias = np.array([1.0, 10.0, 100.0], dtype=np.float32)
    f32 = schema.TensorType.FLOAT32
    tensors = [
        _tensor(schema, "image", [1, 4, 4, 3], f32, 0),
        _tensor(schema, "bias", [3], f32, 1),
        _tensor(schema, "shifted", [1, 4, 4, 3], f32, 0),
    ]
    buffers = [_buffer(schema), _buffer(schema, bias)]
    op = _operator(schema, [0, 1], [2], schema.BuiltinOptions.AddOptions, schema.AddOptionsT())
    _write(schema, path, tensors, buffers, op, schema.BuiltinOperator.ADD, None)
    return TfliteModel(path=path, weights={"bias": bias})


@pytest.fixture(scope="session")
def tflite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tflite")


@pytest.fixture(scope="session")
def fc_tflite(tflite_dir: Path) -> TfliteModel:
    return build_fc_tflite(tflite_dir / "fc.tflite")


@pytest.fixture(scope="session")
def int8_fc_tflite(tflite_dir: Path) -> TfliteModel:
    return build_int8_fc_tflite(tflite_dir / "fc_int8.tflite")


@pytest.fixture(scope="session")
def nhwc_add_tflite(tflite_dir: Path) -> TfliteModel:
    return build_nhwc_add_tflite(tflite_dir / "add_nhwc.tflite")
