"""Small real conv models as .tflite files, and signed LiteRT bundles of them with self-test vectors.

``build_conv_tflite(path, quantized)`` writes ``input`` [1, 8, 8, 1] (NHWC) → CONV_2D (4 filters 3x3, SAME,
fused ReLU) → FULLY_CONNECTED (10) → ``logits`` [1, 10], with the TFLite flatbuffer schema ai-edge-litert
ships (no TensorFlow), reusing the tensor/buffer/opcode helpers of ``tests/runtimes/conftest.py``. The
quantized variant is what an int8 converter writes: int8 activations, per-channel int8 conv filters,
per-tensor int8 FC weights, int32 biases. ``conv_bundle`` signs one with self-test vectors whose expected
outputs this host's LiteRT computes, as the compiler does; ``alter`` shifts one expected value so the
bundle's self-test must fail on every device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.bundle import BundleFile, write_bundle
from edgepack.keys import SigningKey
from edgepack.manifest import RuntimeRequirement, SelfTest, TensorSpec
from edgepack.runtimes.base import RuntimeOptions, get_backend
from edgepack.selftest import write_vectors
from tests.runtimes.conftest import _buffer, _opcode, _operator, _quant, _schema, _signature, _tensor

SEED = 2024
INPUT = TensorSpec(name="input", dtype="float32", shape=[1, 8, 8, 1])
LOGITS = TensorSpec(name="logits", dtype="float32", shape=[1, 10])


@dataclass(frozen=True)
class ConvWeights:
    conv_w: np.ndarray  # [4, 3, 3, 1] OHWI, as TFLite stores conv filters
    conv_b: np.ndarray  # [4]
    fc_w: np.ndarray  # [10, 256]
    fc_b: np.ndarray  # [10]

    @classmethod
    def random(cls) -> ConvWeights:
        rng = np.random.default_rng(SEED)
        return cls(
            conv_w=rng.normal(0, 0.5, (4, 3, 3, 1)).astype(np.float32),
            conv_b=rng.normal(0, 0.1, 4).astype(np.float32),
            fc_w=rng.normal(0, 0.1, (10, 256)).astype(np.float32),
            fc_b=rng.normal(0, 0.1, 10).astype(np.float32),
        )

    def hidden(self, x: np.ndarray) -> np.ndarray:
        """ReLU(conv(x)) in float64, NHWC [n, 8, 8, 4]."""
        padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))  # [n,8,8,1,3,3]
        conv = np.einsum("nhwcij,fijc->nhwf", windows, self.conv_w) + self.conv_b
        return np.maximum(conv, 0.0)

    def reference(self, x: np.ndarray) -> np.ndarray:
        hidden = self.hidden(x).reshape(x.shape[0], -1)  # FULLY_CONNECTED flattens NHWC in h, w, c order
        return hidden @ self.fc_w.T.astype(np.float64) + self.fc_b


def sample_inputs(count: int, seed: int = SEED + 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, (1, 8, 8, 1)).clip(-3.9, 3.9).astype(np.float32) for _ in range(count)]


@dataclass(frozen=True)
class Int8Scales:
    """Affine parameters of the quantized model's activations: real = (q - zero_point) * scale."""

    input: tuple[float, int]
    hidden: tuple[float, int]
    output: tuple[float, int]


def int8_scales(weights: ConvWeights) -> Int8Scales:
    """Ranges measured on calibration inputs, as a post-training quantizer would."""
    calibration = np.concatenate(sample_inputs(32, seed=SEED + 2))
    hidden_max = float(weights.hidden(calibration).max())
    out_max = float(np.abs(weights.reference(calibration)).max())
    return Int8Scales(input=(4.0 / 127, 0), hidden=(hidden_max / 255, -128), output=(1.25 * out_max / 127, 0))


def build_conv_tflite(path: Path, *, quantized: bool = False) -> ConvWeights:
    schema = _schema()
    w = ConvWeights.random()
    f32, i8, i32 = schema.TensorType.FLOAT32, schema.TensorType.INT8, schema.TensorType.INT32
    if quantized:
        s = int8_scales(w)
        conv_scales = np.abs(w.conv_w).reshape(4, -1).max(axis=1) / 127
        fc_scale = float(np.abs(w.fc_w).max() / 127)
        conv_q = np.round(w.conv_w / conv_scales[:, None, None, None]).astype(np.int8)
        conv_bq = np.round(w.conv_b / (s.input[0] * conv_scales)).astype(np.int32)
        fc_q = np.round(w.fc_w / fc_scale).astype(np.int8)
        fc_bq = np.round(w.fc_b / (s.hidden[0] * fc_scale)).astype(np.int32)
        tensors = [
            _tensor(schema, "input", [1, 8, 8, 1], i8, 0, _quant(schema, *s.input)),
            _tensor(schema, "conv/filter", [4, 3, 3, 1], i8, 1, _per_channel(schema, conv_scales)),
            _tensor(schema, "conv/bias", [4], i32, 2, _per_channel(schema, s.input[0] * conv_scales)),
            _tensor(schema, "conv/relu", [1, 8, 8, 4], i8, 0, _quant(schema, *s.hidden)),
            _tensor(schema, "fc/weights", [10, 256], i8, 3, _quant(schema, fc_scale, 0)),
            _tensor(schema, "fc/bias", [10], i32, 4, _quant(schema, s.hidden[0] * fc_scale, 0)),
            _tensor(schema, "logits", [1, 10], i8, 0, _quant(schema, *s.output)),
        ]
        data = [conv_q, conv_bq, fc_q, fc_bq]
    else:
        tensors = [
            _tensor(schema, "input", [1, 8, 8, 1], f32, 0),
            _tensor(schema, "conv/filter", [4, 3, 3, 1], f32, 1),
            _tensor(schema, "conv/bias", [4], f32, 2),
            _tensor(schema, "conv/relu", [1, 8, 8, 4], f32, 0),
            _tensor(schema, "fc/weights", [10, 256], f32, 3),
            _tensor(schema, "fc/bias", [10], f32, 4),
            _tensor(schema, "logits", [1, 10], f32, 0),
        ]
        data = [w.conv_w, w.conv_b, w.fc_w, w.fc_b]
    conv_options = schema.Conv2DOptionsT()
    conv_options.padding, conv_options.strideW, conv_options.strideH = schema.Padding.SAME, 1, 1
    conv_options.fusedActivationFunction = schema.ActivationFunctionType.RELU
    conv = _operator(schema, [0, 1, 2], [3], schema.BuiltinOptions.Conv2DOptions, conv_options)
    fc = _operator(schema, [3, 4, 5], [6], schema.BuiltinOptions.FullyConnectedOptions, schema.FullyConnectedOptionsT())
    fc.opcodeIndex = 1
    _write_model(
        schema,
        path,
        tensors=tensors,
        buffers=[_buffer(schema)] + [_buffer(schema, array) for array in data],
        operators=[conv, fc],
        opcodes=[schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.FULLY_CONNECTED],
        signature=_signature(schema, {"input": 0}, {"logits": 6}),
    )
    return w


def _per_channel(schema: Any, scales: np.ndarray) -> Any:
    q = schema.QuantizationParametersT()
    q.scale = [float(v) for v in scales]
    q.zeroPoint = [0] * len(scales)
    q.quantizedDimension = 0
    return q


def _write_model(
    schema: Any,
    path: Path,
    *,
    tensors: list[Any],
    buffers: list[Any],
    operators: list[Any],
    opcodes: list[int],
    signature: Any,
) -> None:
    """A one-subgraph model whose first tensor is the input and last the output (several operators)."""
    import flatbuffers

    subgraph = schema.SubGraphT()
    subgraph.tensors, subgraph.operators = tensors, operators
    subgraph.inputs, subgraph.outputs = [0], [len(tensors) - 1]
    model = schema.ModelT()
    model.version = 3
    model.operatorCodes = [_opcode(schema, code) for code in opcodes]
    model.subgraphs = [subgraph]
    model.buffers = buffers
    model.description = "edgepack arm-check test model"
    model.signatureDefs = [signature]
    builder = flatbuffers.Builder(4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))


def host_outputs(model_path: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """What this host's LiteRT answers, through edgepack's backend, as the compiler computes self-test outputs."""
    model = get_backend("litert").load(model_path, inputs=[INPUT], outputs=[LOGITS], options=RuntimeOptions(threads=1))
    try:
        return [model.infer({"input": x})["logits"] for x in inputs]
    finally:
        model.close()


def conv_bundle(
    workdir: Path,
    key: SigningKey,
    *,
    name: str,
    quantized: bool = False,
    target: str = "arm64",
    samples: int = 6,
    alter: tuple[int, int, float] | None = None,
) -> Path:
    """A signed LiteRT bundle of the conv model; ``alter=(sample, index, delta)`` corrupts one expected value."""
    src = workdir / f"{name}-src"
    src.mkdir(parents=True, exist_ok=True)
    build_conv_tflite(src / "model.tflite", quantized=quantized)
    inputs = sample_inputs(samples)
    outputs = host_outputs(src / "model.tflite", inputs)
    if alter is not None:
        sample, index, delta = alter
        outputs[sample] = outputs[sample].copy()
        outputs[sample].flat[index] += delta
    write_vectors(src / "selftest.npz", [{"input": x} for x in inputs], [{"logits": y} for y in outputs])
    # int8: one output quantum of slack, what requantization on another CPU may round differently
    atol, rtol = (int8_scales(ConvWeights.random()).output[0] * 1.01, 0.0) if quantized else (1e-4, 1e-4)
    out = workdir / f"{name}.epk"
    write_bundle(
        out,
        files=[
            BundleFile("model.tflite", src / "model.tflite", "model"),
            BundleFile("selftest.npz", src / "selftest.npz", "selftest"),
        ],
        signers=[key],
        name=name,
        version="1.0.0",
        target=target,
        runtime=RuntimeRequirement(name="litert", version=">=1.2"),
        model_file="model.tflite",
        inputs=[INPUT],
        outputs=[LOGITS],
        quantization={"method": "int8 per-channel (test model)"} if quantized else None,
        selftest=SelfTest(vectors="selftest.npz", atol=atol, rtol=rtol, samples=samples),
    )
    return out
