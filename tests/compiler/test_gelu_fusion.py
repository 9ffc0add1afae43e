"""gelu_fusion: exact GELU subgraphs become one ONNX Gelu node, and nothing else does."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.compiler.gelu_fusion import fuse_exact_gelu

SQRT2 = float(np.float32(np.sqrt(2.0)))


def _gelu_model(
    *, divisor: float = SQRT2, as_constant_nodes: bool = False, erf_is_output: bool = False
) -> onnx.ModelProto:
    """x [1, 8] -> MatMul -> GELU as exporters write it (Div, Erf, Add, Mul, Mul) -> y; opset 17."""
    rng = np.random.default_rng(0)
    values = {"w": rng.normal(size=(8, 8)).astype(np.float32), "sqrt2": np.array(divisor, np.float32),
              "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32)}  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Div", ["h", "sqrt2"], ["d"], name="div"),
        helper.make_node("Erf", ["d"], ["e"], name="erf"),
        helper.make_node("Add", ["e", "one"], ["a"], name="add"),
        helper.make_node("Mul", ["h", "a"], ["m"], name="mul"),
        helper.make_node("Mul", ["m", "half"], ["y"], name="half"),
    ]
    initializers = [numpy_helper.from_array(values["w"], "w")]
    constants = {k: v for k, v in values.items() if k != "w"}
    if as_constant_nodes:
        nodes = [
            helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k), name=f"c_{k}")
            for k, v in constants.items()
        ] + nodes
    else:
        initializers += [numpy_helper.from_array(v, k) for k, v in constants.items()]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])]
    if erf_is_output:
        outputs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 8]))
    graph = helper.make_graph(
        nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])], outputs, initializers
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


@pytest.mark.parametrize("as_constant_nodes", [False, True])
def test_an_exact_gelu_becomes_one_gelu_node_with_the_same_outputs(as_constant_nodes: bool) -> None:
    original = _gelu_model(as_constant_nodes=as_constant_nodes)
    fused, count = fuse_exact_gelu(original)
    assert count == 1
    ops = [n.op_type for n in fused.graph.node if n.op_type != "Constant"]
    assert ops == ["MatMul", "Gelu"]
    assert next(i.version for i in fused.opset_import if i.domain == "") == 20
    onnx.checker.check_model(fused, full_check=True)
    x = np.random.default_rng(1).normal(size=(1, 8)).astype(np.float32) * 3
    np.testing.assert_allclose(_run(fused, x), _run(original, x), atol=1e-6)


def test_other_constants_or_a_shared_intermediate_are_left_alone() -> None:
    for model in (_gelu_model(divisor=2.0), _gelu_model(erf_is_output=True)):
        fused, count = fuse_exact_gelu(model)
        assert count == 0 and fused is model
        assert [n.op_type for n in fused.graph.node].count("Erf") == 1


def test_a_fusion_that_changes_the_outputs_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check run: the fused model must compute what the original does (here a broken opset conversion
    is faked by one that also scales a weight)."""
    original = _gelu_model()
    x = {"x": np.random.default_rng(3).normal(size=(1, 8)).astype(np.float32)}
    assert fuse_exact_gelu(original, check_feed=x)[1] == 1  # a faithful fusion passes its check
    real = onnx.version_converter.convert_version

    def wrong(proto: onnx.ModelProto, version: int) -> onnx.ModelProto:
        converted = real(proto, version)
        w = next(t for t in converted.graph.initializer if t.name == "w")
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, "w"))
        return converted

    monkeypatch.setattr(onnx.version_converter, "convert_version", wrong)
    fused, count = fuse_exact_gelu(original, check_feed=x)
    assert count == 0 and fused is original
    assert fuse_exact_gelu(original)[1] == 1  # unchecked, the (wrong) fusion would have gone through
