"""quantize_ort: per-channel QDQ on an old-opset model, and the settings each target gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.compiler.pipeline import CompileResult
from edgepack.compiler.quantize_ort import Int8Settings, ensure_opset, quantize_int8
from edgepack.targets.registry import get_target


def _conv_model(opset: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def test_old_opset_is_raised_to_13_for_per_channel_qdq(tmp_path: Path) -> None:
    old = _conv_model(11)
    raised = ensure_opset(old)
    assert next(i.version for i in raised.opset_import if i.domain == "") == 13
    assert ensure_opset(raised) is raised
    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(raised, str(src))
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    quantize_int8(src, dst, feeds, Int8Settings())
    q = onnx.load(str(dst))
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert any(a.name == "axis" for n in dq for a in n.attribute), "weights are not per-channel"
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])  # refuses axis below opset 13
    out = session.run(None, feeds[0])[0]
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.99


def test_settings_per_target() -> None:
    cpu = Int8Settings.for_target(get_target("x86"))
    assert (cpu.activation_type, cpu.weight_type, cpu.per_channel) == ("uint8", "int8", True)
    assert cpu.reduce_range and not cpu.activation_symmetric
    trt = Int8Settings.for_target(get_target("jetson"))
    assert (trt.activation_type, trt.activation_symmetric) == ("int8", True)
    assert cpu.to_dict()["format"] == "QDQ" and cpu.dynamic().to_dict()["format"] == "dynamic"


def _compile_mlp(tmp_path: Path) -> CompileResult:
    from edgepack.compiler.pipeline import CompileRequest, compile_model
    from edgepack.keys import SigningKey

    rng = np.random.default_rng(2)
    w1 = numpy_helper.from_array(rng.normal(size=(64, 128)).astype(np.float32) / 8, "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(128, 10)).astype(np.float32) / 11, "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [w1, w2],
    )
    model = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.normal(size=(64, 64)).astype(np.float32))
    return compile_model(
        CompileRequest(
            model=model,
            target="x86",
            calibration=data,
            keys=[SigningKey.generate()],
            output=tmp_path / "mlp.epk",
            max_accuracy_drop=5.0,
        )
    )


def test_matmul_model_also_tries_dynamic_int8(tmp_path: Path) -> None:
    result = _compile_mlp(tmp_path)
    assert result.precision == "int8"
    tries = result.attempts[0]["tries"]
    dynamic = [t for t in tries if t["step"] == "dynamic"]
    assert dynamic and dynamic[0]["passed"] and dynamic[0]["latency_ms"] > 0, tries
    assert result.quantization is not None and result.quantization["method"] in ("static", "dynamic")


def test_a_crashing_dynamic_quantizer_keeps_the_static_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime.quantization

    def crash(*_args: object, **_kwargs: object) -> None:
        raise ValueError("MatMul weight layout not understood")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", crash)
    result = _compile_mlp(tmp_path)
    assert result.precision == "int8" and result.quantization is not None
    assert result.quantization["method"] == "static"
    dynamic = [t for t in result.attempts[0]["tries"] if t["step"] == "dynamic"]
    assert "MatMul weight layout not understood" in dynamic[0]["error"]
