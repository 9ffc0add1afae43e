"""Recurrent state in and out: an LSTM voice-activity detector compiles for rpi4 (its LSTM unrolled for
onnx2tf, whose Keras LSTM refuses the state), the unrolled graph computes what the LSTM does, and an LSTM
that cannot be unrolled gets an error that says why and what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.bundle import verify_bundle
from edgepack.compiler.pipeline import CompileRequest, compile_model
from edgepack.compiler.recurrent_unroll import unroll_lstms, why_not_unrolled
from edgepack.compiler.tflite_convert import _conversion_error
from edgepack.compiler.toolchain import Toolchain
from edgepack.errors import UnsupportedModelError

from .conftest import Signing
from .litert_fixtures import tflite_toolchain  # noqa: F401  (session fixture)
from .recurrent_models import lstm_vad, vad_samples


def _lstm(direction: str, *, steps: int = 3, state: bool = True, bias: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    hidden, features, batch = 4, 5, 2
    dirs = 2 if direction == "bidirectional" else 1
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (dirs, 4 * hidden, features)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(0, 0.5, (dirs, 4 * hidden, hidden)).astype(np.float32), "R"),
    ]
    names = ["x", "W", "R", "B" if bias else "", "", "h0" if state else "", "c0" if state else ""]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (dirs, 8 * hidden)).astype(np.float32), "B"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, batch, features])]
    if state:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [dirs, batch, hidden]) for n in ("h0", "c0")]
    node = helper.make_node("LSTM", names, ["y", "y_h", "y_c"], name="rnn", hidden_size=hidden, direction=direction)
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [steps, dirs, batch, hidden]),
        helper.make_tensor_value_info("y_h", TensorProto.FLOAT, [dirs, batch, hidden]),
        helper.make_tensor_value_info("y_c", TensorProto.FLOAT, [dirs, batch, hidden]),
    ]
    model = helper.make_model(
        helper.make_graph([node], "lstm", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return model


def _feed(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feed = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feed[value.name] = rng.normal(0, 1, shape).astype(np.float32)
    return feed


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize(
    ("direction", "state", "bias"), [("forward", True, True), ("reverse", True, True), ("forward", False, False)]
)
def test_the_unrolled_lstm_computes_what_the_lstm_does(direction: str, state: bool, bias: bool) -> None:
    model = _lstm(direction, state=state, bias=bias)
    feed = _feed(model)
    unrolled, names = unroll_lstms(model, check_feed=feed)
    assert names == ["rnn"]
    assert "LSTM" not in {n.op_type for n in unrolled.graph.node}
    for before, after in zip(_run(model, feed), _run(unrolled, feed), strict=True):
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)


def test_an_lstm_that_cannot_be_unrolled_is_left_alone_and_the_error_says_why(tmp_path: Path) -> None:
    model = _lstm("bidirectional")
    assert unroll_lstms(model, check_feed=_feed(model)) == (model, [])
    assert why_not_unrolled(model, "rnn") == "bidirectional"
    error = _conversion_error(
        {"node": "rnn", "error_type": "ValueError", "error": "cell.state_size is [4, 4]"}, model, tmp_path / "x.log"
    )
    assert isinstance(error, UnsupportedModelError)
    text = str(error)
    assert "recurrent node 'rnn' (op LSTM)" in text and "because bidirectional" in text
    assert "static sequence length" in text and "(x86, intel-cpu)" in text


def test_an_lstm_with_state_in_and_out_compiles_for_rpi4(
    tflite_toolchain: Toolchain,  # noqa: F811
    signing: Signing,
    tmp_path: Path,
) -> None:
    model = lstm_vad(tmp_path / "vad.onnx")
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, **vad_samples(16))
    out = tmp_path / "vad.epk"
    request = CompileRequest(model=model, target="rpi4", calibration=calibration, keys=[signing.key_file], output=out)
    result = compile_model(request)
    assert result.accuracy.passed, result.accuracy.failures
    assert result.precision in ("int8", "fp32")
    assert {o.name for o in result.accuracy.outputs} == {"output", "stateN"}
    assert all(o.cosine_mean >= 0.99 for o in result.accuracy.outputs)
    manifest = verify_bundle(out, signing.trust)
    assert [i.name for i in manifest.inputs] == ["input", "state"]
    assert [list(i.shape) for i in manifest.inputs] == [[1, 512], [2, 1, 128]]
