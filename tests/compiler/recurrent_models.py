"""A Silero-VAD-shaped ONNX model with recurrent state in and out, built with ``onnx.helper`` and numpy.

Inputs ``input`` [1, 512] (an audio chunk) and ``state`` [2, 1, 128] (h and c of the LSTM); outputs
``output`` [1, 1] (a speech probability) and ``stateN`` [2, 1, 128]. One ONNX ``LSTM`` node, sequence length
1, its initial state sliced from ``state`` and its final state concatenated back. Random weights (seeded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 128
FEATURES = 64


def lstm_vad(path: Path, *, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    h = HIDDEN

    def init(name: str, shape: tuple[int, ...], scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    inits = [
        init("enc_w", (512, FEATURES), 1 / np.sqrt(512)),
        init("enc_b", (FEATURES,), 0.1),
        init("lstm_w", (1, 4 * h, FEATURES), 1 / np.sqrt(FEATURES)),
        init("lstm_r", (1, 4 * h, h), 1 / np.sqrt(h)),
        init("lstm_b", (1, 8 * h), 0.1),
        init("dec_w", (h, 1), 1 / np.sqrt(h)),
        init("dec_b", (1,), 0.1),
        numpy_helper.from_array(np.array([1, 1, FEATURES], np.int64), "seq_shape"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
        numpy_helper.from_array(np.array([0, 1], np.int64), "axes01"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "enc_w"], ["enc_mm"], name="enc_matmul"),
        helper.make_node("Add", ["enc_mm", "enc_b"], ["enc_add"], name="enc_add"),
        helper.make_node("Relu", ["enc_add"], ["enc"], name="enc_relu"),
        helper.make_node("Reshape", ["enc", "seq_shape"], ["x_seq"], name="to_sequence"),
        helper.make_node("Slice", ["state", "zero", "one", "zero"], ["h0"], name="state_h"),
        helper.make_node("Slice", ["state", "one", "two", "zero"], ["c0"], name="state_c"),
        helper.make_node(
            "LSTM",
            ["x_seq", "lstm_w", "lstm_r", "lstm_b", "", "h0", "c0"],
            ["y", "y_h", "y_c"],
            name="lstm",
            hidden_size=h,
        ),
        helper.make_node("Concat", ["y_h", "y_c"], ["stateN"], name="state_out", axis=0),
        helper.make_node("Squeeze", ["y", "axes01"], ["y_last"], name="y_squeeze"),
        helper.make_node("MatMul", ["y_last", "dec_w"], ["dec_mm"], name="dec_matmul"),
        helper.make_node("Add", ["dec_mm", "dec_b"], ["dec_add"], name="dec_add"),
        helper.make_node("Sigmoid", ["dec_add"], ["output"], name="dec_sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "lstm_vad",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 512]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, h]),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, 1, h]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def vad_samples(n: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` calibration samples: noisy tone chunks and the states a stream would carry ([n, 2, 1, 128])."""
    rng = np.random.default_rng(seed)
    t = np.arange(512, dtype=np.float32) / 16000
    chunks = []
    for _ in range(n):
        tone = np.sin(2 * np.pi * rng.uniform(100, 800) * t) * rng.uniform(0, 0.5)
        chunks.append(tone + rng.normal(0, 0.05, 512))
    state = np.tanh(rng.normal(0, 0.5, (n, 2, 1, HIDDEN)))
    return {"input": np.asarray(chunks, np.float32), "state": state.astype(np.float32)}
