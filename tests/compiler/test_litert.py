"""The LiteRT family end to end: ONNX → onnx2tf (managed toolchain) → ai-edge-quantizer int8 → bundle → agent.

The sample digits CNN compiled for ``rpi4``: the bundle verifies, its self-test passes under LiteRT on this
host, int8 keeps top-1 on held-out digits within a point of fp32, and the agent serves it to tritonclient in
the model's original NCHW layout. Beside it: names and output order mapped back from onnx2tf, channel-first
outputs, no network during conversion, an op onnx2tf cannot convert named with its node, and a ``.tflite``
source compiled. The toolchain is the cached one (see ``litert_fixtures``), never rebuilt here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.bundle import extract_bundle, verify_bundle
from edgepack.compiler.load import tensor_specs
from edgepack.compiler.pipeline import CompileRequest, compile_model
from edgepack.compiler.tflite_convert import SAMPLE_IMAGE_FILE, convert_onnx
from edgepack.compiler.tflite_graph import describe
from edgepack.compiler.toolchain import Toolchain
from edgepack.errors import QuantizerError, UnsupportedModelError
from edgepack.runtimes.base import RuntimeOptions, get_backend
from edgepack.selftest import run_selftest
from tests.runtimes.conftest import build_fc_tflite, build_int8_fc_tflite

from .conftest import SAMPLE_MODEL, Compile, Digits, Signing, top1
from .litert_fixtures import tflite_toolchain  # noqa: F401  (session fixture)

pytest.importorskip("ai_edge_litert")
pytest.importorskip("ai_edge_quantizer")


def _litert(path: Path, manifest_or_specs, threads: int = 1):
    inputs, outputs = (
        (manifest_or_specs.inputs, manifest_or_specs.outputs)
        if hasattr(manifest_or_specs, "inputs")
        else manifest_or_specs
    )
    return get_backend("litert").load(path, inputs=inputs, outputs=outputs, options=RuntimeOptions(threads=threads))


@pytest.fixture(scope="module")
def rpi4(compile_sample: Compile, tflite_toolchain: Toolchain):  # noqa: F811
    return compile_sample("rpi4")


# --- the sample model on rpi4 ----------------------------------------------------------------------


def test_rpi4_bundle_verifies_and_selftest_passes_under_litert(rpi4, signing: Signing, tmp_path: Path) -> None:
    assert rpi4.precision == "int8" and rpi4.accuracy.passed
    manifest = verify_bundle(rpi4.output, signing.trust)
    assert manifest.target == "rpi4" and manifest.runtime.name == "litert" and manifest.model_file == "model.tflite"
    assert manifest.runtime.admits("2.3.0")
    # names, order and layout are the source model's; the device model is NHWC
    (spec_in,) = manifest.inputs
    assert (spec_in.name, spec_in.shape, spec_in.layout, spec_in.native_layout) == (
        "input",
        [1, 1, 8, 8],
        "NCHW",
        "NHWC",
    )
    assert [o.name for o in manifest.outputs] == ["logits"] and manifest.outputs[0].dtype == "float32"
    # full-integer int8 by ai-edge-quantizer; onnx2tf's log travels with the bundle
    q = manifest.quantization
    assert q["tool"].startswith("ai-edge-quantizer") and q["full_integer"] is True and q["ops_float"] == {}
    assert q["conversion"]["converter"].startswith("onnx2tf 1.29")
    assert manifest.file("logs/onnx2tf.log").role == "log"
    assert manifest.toolchain["tflite-toolchain/onnx2tf"] == "1.29.24"
    assert manifest.execution["delegate"] == "xnnpack"

    bundle_dir = tmp_path / "bundle"
    extract_bundle(rpi4.output, bundle_dir, signing.trust)
    info = describe(bundle_dir / "model.tflite")
    assert [t.dtype for t in [*info.inputs, *info.outputs]] == ["int8", "int8"]
    assert info.inputs[0].shape == (1, 8, 8, 1) and info.inputs[0].key == "input"
    model = _litert(bundle_dir / manifest.model_file, manifest)
    try:
        report = run_selftest(
            model, bundle_dir / manifest.selftest.vectors, manifest.selftest.atol, manifest.selftest.rtol
        )
    finally:
        model.close()
    assert report.passed


def test_int8_top1_on_held_out_digits_within_one_point_of_fp32(
    rpi4, digits: Digits, signing: Signing, tmp_path: Path
) -> None:
    test = np.load(digits.test)
    x, labels = test["input"], test["labels"]
    fp32_acc = float(np.mean(top1(SAMPLE_MODEL, x) == labels)) * 100
    bundle_dir = tmp_path / "bundle"
    manifest = extract_bundle(rpi4.output, bundle_dir, signing.trust)
    model = _litert(bundle_dir / manifest.model_file, manifest)
    try:
        predicted = np.array([model.infer({"input": x[i : i + 1]})["logits"].argmax() for i in range(len(x))])
    finally:
        model.close()
    int8_acc = float(np.mean(predicted == labels)) * 100
    print(f"\n[rpi4] held-out digits ({len(x)}): fp32 {fp32_acc:.2f}%  int8 LiteRT {int8_acc:.2f}%")
    assert int8_acc >= fp32_acc - 1.0


def test_agent_serves_it_to_tritonclient_in_nchw(rpi4, signing: Signing, digits: Digits, tmp_path: Path) -> None:
    import tritonclient.http as httpclient

    from edgepack.agent.config import load_config
    from edgepack.agent.service import DeviceAgent

    config = load_config(
        None,
        {
            "state_dir": str(tmp_path / "state"),
            "trust_dir": str(signing.trust.directory),
            "targets": ["rpi4"],
            "listen": "127.0.0.1:0",
        },
    )
    device = DeviceAgent(config)
    device.boot()
    try:
        device.install(rpi4.output)
        client = httpclient.InferenceServerClient(device.start_api().url)
        meta = client.get_model_metadata("digits-cnn")
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8]}]
        assert [o["name"] for o in meta["outputs"]] == ["logits"]
        test = np.load(digits.test)
        hits = 0
        for i in range(20):
            x = np.ascontiguousarray(test["input"][i : i + 1])  # NCHW, as for the x86 bundle
            inp = httpclient.InferInput("input", [1, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            result = client.infer("digits-cnn", [inp], outputs=[httpclient.InferRequestedOutput("logits")])
            logits = result.as_numpy("logits")
            assert logits.shape == (1, 10) and logits.dtype == np.float32
            hits += int(logits.argmax() == test["labels"][i])
        assert hits >= 19
    finally:
        device.close()


# --- conversion: names, order, layouts, offline, errors ---------------------------------------------


def _two_output_model(path: Path) -> Path:
    """input "input:0" [1,3,8,8] -> Conv -> Relu = "features:0" [1,4,8,8] (NCHW) and -> Gemm = "scores"
    [1,5]; graph outputs listed scores first. A 3-channel image input: onnx2tf would download sample images."""
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(0, 0.1, (5, 256)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, 5).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input:0", "w", "b"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["features:0"], name="relu"),
        helper.make_node("Flatten", ["features:0"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["scores"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_outputs",
        [helper.make_tensor_value_info("input:0", TensorProto.FLOAT, [1, 3, 8, 8])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 5]),
            helper.make_tensor_value_info("features:0", TensorProto.FLOAT, [1, 4, 8, 8]),
        ],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_names_order_and_layouts_are_the_source_models(tflite_toolchain: Toolchain, tmp_path: Path) -> None:  # noqa: F811
    import onnxruntime as ort

    path = _two_output_model(tmp_path / "two.onnx")
    proto = onnx.load(str(path))
    rng = np.random.default_rng(0)
    samples = [{"input:0": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(4)]
    converted = convert_onnx(
        path, tmp_path / "work", inputs=tensor_specs(proto, "input"), outputs=tensor_specs(proto, "output"),
        samples=samples, toolchain=tflite_toolchain,
    )  # fmt: skip
    assert [(s.name, s.layout, s.native_layout) for s in converted.inputs] == [("input:0", "NCHW", "NHWC")]
    assert [(s.name, s.layout, s.native_layout) for s in converted.outputs] == [
        ("scores", None, None),
        ("features:0", "NCHW", "NHWC"),
    ]
    info = describe(converted.path)
    assert [t.key for t in info.inputs] == ["input:0"] and [t.name for t in info.inputs] == ["input:0"]
    assert [t.key for t in info.outputs] == ["scores", "features:0"]
    assert info.outputs[1].shape == (1, 8, 8, 4)  # channel-last on the device
    # offline: onnx2tf read edgepack's sample-image file (the user's samples) instead of downloading one
    written = np.load(tmp_path / "work" / "onnx2tf" / SAMPLE_IMAGE_FILE)
    assert written.shape == (4, 8, 8, 3)
    assert "127.0.0.1:9" not in converted.log_path.read_text()  # nothing even tried the (blocked) network
    # onnx2tf's float16 copy, which edgepack never uses, was not converted (it costs as much as the float32)
    assert [p.name for p in (tmp_path / "work" / "onnx2tf" / "out").glob("*.tflite")] == ["model_float32.tflite"]

    session = ort.InferenceSession(str(path))
    model = _litert(converted.path, (converted.inputs, converted.outputs))
    try:
        for feed in samples:
            expected = dict(zip(["scores", "features:0"], session.run(["scores", "features:0"], feed), strict=True))
            got = model.infer(feed)
            assert list(got) == ["scores", "features:0"]
            for name, value in expected.items():
                np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-4)
    finally:
        model.close()


def test_the_driver_falls_back_to_the_keras_model_without_a_saved_model(
    tflite_toolchain: Toolchain,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The float .tflite normally comes from the saved model onnx2tf writes (4 s instead of ~95 s on a
    ResNet-50); with none there, the driver converts the Keras model onnx2tf returns, as onnx2tf would."""
    import subprocess

    from edgepack.compiler.tflite_convert import DRIVER

    script = f"""
import sys
sys.path.insert(0, {str(DRIVER.parent)!r})
import tf_keras
import onnx2tf_driver
model = tf_keras.Sequential([tf_keras.Input(shape=(4,)), tf_keras.layers.Dense(3)])
print("route", onnx2tf_driver._write_float_tflite({str(tmp_path)!r}, model))
"""
    (tmp_path / "empty.tflite").write_bytes(b"")  # what the skipped conversions leave behind
    done = subprocess.run(
        [str(tflite_toolchain.python), "-c", script], env=tflite_toolchain.env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "route keras_model" in done.stdout
    assert sorted(p.name for p in tmp_path.glob("*.tflite")) == ["model_float32.tflite"]
    info = describe(tmp_path / "model_float32.tflite")
    assert [(t.shape, t.dtype) for t in info.inputs] == [((-1, 4), "float32")]
    assert [(t.shape, t.dtype) for t in info.outputs] == [((-1, 3), "float32")]


def test_an_op_onnx2tf_cannot_convert_is_named_with_its_node(tflite_toolchain: Toolchain, tmp_path: Path) -> None:  # noqa: F811
    proto = onnx.load(str(SAMPLE_MODEL))
    graph = proto.graph
    relu = next(n for n in graph.node if n.op_type == "Relu")
    out = relu.output[0]
    graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float16), "like_fp16"))
    for node in graph.node:
        node.input[:] = [f"{out}_f" if (i == out and node is not relu) else i for i in node.input]
    at = list(graph.node).index(relu) + 1
    graph.node.insert(at, helper.make_node("Cast", [f"{out}_h"], [f"{out}_f"], to=TensorProto.FLOAT, name="half/back"))
    graph.node.insert(at, helper.make_node("CastLike", [out, "like_fp16"], [f"{out}_h"], name="half/CastLike"))
    path = tmp_path / "castlike.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(UnsupportedModelError, match=r"node 'half/CastLike' \(op CastLike\)") as err:
        convert_onnx(
            path, tmp_path / "work", inputs=tensor_specs(proto, "input"), outputs=tensor_specs(proto, "output"),
            toolchain=tflite_toolchain,
        )  # fmt: skip
    kept_log = Path(str(err.value).rsplit("log: ", 1)[1])
    assert kept_log.is_file() and "CastLike" in kept_log.read_text()  # kept after the temporary folder goes


def _unary_model(path: Path, op: str) -> onnx.ModelProto:
    """x [1, 16] -> OP -> Mul by 1.5 -> y, named "the_op" and "scale"."""
    nodes = [
        helper.make_node(op, ["x"], ["t"], name="the_op"),
        helper.make_node("Mul", ["t", "k"], ["y"], name="scale"),
    ]
    graph = helper.make_graph(
        nodes, "unary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(np.array([1.5], np.float32), "k")],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(proto, str(path))
    return proto


def test_erf_converts_to_builtin_ops_that_litert_runs(tflite_toolchain: Toolchain, tmp_path: Path) -> None:  # noqa: F811
    """TFLite has no builtin Erf (GELU in transformers): onnx2tf's TensorFlow Erf would need the Flex delegate,
    which LiteRT lacks. The converter asks onnx2tf for its builtin-op Erf, exact to ~1e-7."""
    import onnxruntime as ort

    proto = _unary_model(tmp_path / "erf.onnx", "Erf")
    x = np.linspace(-4, 4, 16, dtype=np.float32)[None, :]
    converted = convert_onnx(
        tmp_path / "erf.onnx", tmp_path / "work", inputs=tensor_specs(proto, "input"),
        outputs=tensor_specs(proto, "output"), samples=[{"x": x}], toolchain=tflite_toolchain,
    )  # fmt: skip
    ops = describe(converted.path).op_counts()
    assert "CUSTOM" not in ops and not any(op.startswith("Flex") for op in ops), ops  # builtins only
    model = _litert(converted.path, (converted.inputs, converted.outputs))
    try:
        got = model.infer({"x": x})["y"]
    finally:
        model.close()
    expected = ort.InferenceSession(str(tmp_path / "erf.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_an_exact_gelu_reaches_tflite_as_its_gelu_op(tflite_toolchain: Toolchain, tmp_path: Path) -> None:  # noqa: F811
    """A transformer's GELU (Div, Erf, Add, Mul, Mul) becomes TFLite's GELU, not onnx2tf's pseudo Erf."""
    import onnxruntime as ort

    from .test_gelu_fusion import _gelu_model

    proto = _gelu_model()
    onnx.save(proto, str(tmp_path / "gelu.onnx"))
    x = np.random.default_rng(2).normal(size=(1, 8)).astype(np.float32)
    converted = convert_onnx(
        tmp_path / "gelu.onnx", tmp_path / "work", inputs=tensor_specs(proto, "input"),
        outputs=tensor_specs(proto, "output"), samples=[{"x": x}], toolchain=tflite_toolchain,
    )  # fmt: skip
    ops = describe(converted.path).op_counts()
    assert ops.get("GELU") == 1 and "EXP" not in ops and "ABS" not in ops, ops
    model = _litert(converted.path, (converted.inputs, converted.outputs))
    try:
        got = model.infer({"x": x})["y"]
    finally:
        model.close()
    np.testing.assert_allclose(got, ort.InferenceSession(str(tmp_path / "gelu.onnx")).run(None, {"x": x})[0], atol=1e-5)


def test_an_op_with_no_tflite_builtin_is_refused_naming_op_and_node(
    tflite_toolchain: Toolchain,  # noqa: F811
    tmp_path: Path,
) -> None:
    proto = _unary_model(tmp_path / "tan.onnx", "Tan")
    with pytest.raises(UnsupportedModelError, match=r"TensorFlow op\(s\) Tan .* node\(s\) 'the_op' \(op Tan\)"):
        convert_onnx(
            tmp_path / "tan.onnx", tmp_path / "work", inputs=tensor_specs(proto, "input"),
            outputs=tensor_specs(proto, "output"), toolchain=tflite_toolchain,
        )  # fmt: skip


def test_a_custom_domain_op_is_refused_at_load_naming_node_and_op(
    digits: Digits, signing: Signing, tmp_path: Path
) -> None:
    proto = onnx.load(str(SAMPLE_MODEL))
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "FastGelu", "com.microsoft"
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(proto, str(path))
    request = CompileRequest(
        model=path, target="rpi4", calibration=digits.calibration, keys=[signing.key_file], output=tmp_path / "x.epk"
    )
    with pytest.raises(UnsupportedModelError, match=rf"node '{relu.name}' \(op com.microsoft::FastGelu\)"):
        compile_model(request)
    assert not (tmp_path / "x.epk").exists()


# --- a .tflite source ------------------------------------------------------------------------------


def test_a_tflite_model_compiles_to_int8_for_rpi5(signing: Signing, tmp_path: Path) -> None:
    source = build_fc_tflite(tmp_path / "fc.tflite").path
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calib.npz", x=rng.normal(0, 1, (200, 8)).astype(np.float32))
    result = compile_model(
        CompileRequest(
            model=source, target="rpi5", calibration=tmp_path / "calib.npz", keys=[signing.key_file],
            output=tmp_path / "fc.epk", max_accuracy_drop=2.0,
        )
    )  # fmt: skip
    assert result.precision == "int8" and result.accuracy.passed
    manifest = verify_bundle(result.output, signing.trust)
    assert manifest.runtime.name == "litert" and [s.name for s in manifest.inputs] == ["x"]
    assert [s.name for s in manifest.outputs] == ["y"] and manifest.quantization["full_integer"] is True
    bundle_dir = tmp_path / "bundle"
    extract_bundle(result.output, bundle_dir, signing.trust)
    assert describe(bundle_dir / "model.tflite").inputs[0].dtype == "int8"
    model = _litert(bundle_dir / manifest.model_file, manifest)
    try:
        assert run_selftest(model, bundle_dir / "selftest.npz", manifest.selftest.atol, manifest.selftest.rtol).passed
    finally:
        model.close()


def test_ai_edge_quantizer_crashing_under_auto_falls_back_to_fp32(
    signing: Signing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ai_edge_quantizer import quantizer

    def crash(*_args: object, **_kwargs: object) -> None:
        raise KeyError("FULLY_CONNECTED")

    monkeypatch.setattr(quantizer.Quantizer, "quantize", crash)
    source = build_fc_tflite(tmp_path / "fc.tflite").path
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(3).normal(0, 1, (64, 8)).astype(np.float32))
    request = CompileRequest(
        model=source, target="rpi5", calibration=tmp_path / "calib.npz", keys=[signing.key_file],
        output=tmp_path / "fc.epk",
    )  # fmt: skip
    result = compile_model(request)
    assert result.precision == "fp32"
    assert "ai-edge-quantizer" in result.attempts[0]["error"] and "KeyError" in result.attempts[0]["error"]
    with pytest.raises(QuantizerError, match="ai-edge-quantizer .* cannot quantize this model to int8: KeyError"):
        compile_model(replace(request, precision="int8", output=tmp_path / "fc-int8.epk"))
    assert not (tmp_path / "fc-int8.epk").exists()


def test_an_int8_kernel_that_refuses_to_run_gets_its_op_kept_in_float(
    tflite_toolchain: Toolchain,  # noqa: F811
    signing: Signing,
    tmp_path: Path,
) -> None:
    """y = h * h / (|h| + eps), h = x @ w, calibrated on samples that include zeros: the int8 divisor
    quantizes to its zero point and LiteRT's DIV kernel refuses to run. The search keeps the DIV and its
    divisor's producer in float instead of failing the compile."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Abs", ["h"], ["a"], name="abs"),
        helper.make_node("Add", ["a", "eps"], ["d"], name="add_eps"),
        helper.make_node("Div", ["h", "d"], ["s"], name="sign_div"),
        helper.make_node("Mul", ["s", "h"], ["y"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes, "divides", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array((rng.normal(size=(16, 16)) / 4).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([1e-3], np.float32), "eps")],
    )  # fmt: skip
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(tmp_path / "m.onnx")
    )
    x = rng.normal(size=(64, 16)).astype(np.float32)
    x[::4] = 0.0
    np.savez(tmp_path / "calib.npz", x=x)
    result = compile_model(
        CompileRequest(
            model=tmp_path / "m.onnx", target="rpi4", precision="int8", calibration=tmp_path / "calib.npz",
            keys=[signing.key_file], output=tmp_path / "m.epk", max_accuracy_drop=5.0,
        )
    )  # fmt: skip
    tries = result.attempts[0]["tries"]
    assert "Node number" in tries[0]["error"] and "(DIV) failed to invoke" in tries[0]["error"]
    assert result.precision == "int8" and tries[-1]["passed"]
    kept = result.kept_in_float[0]
    assert kept.reason.startswith("fails to run in int8 on LiteRT") and any("truediv" in n for n in kept.nodes)
    assert verify_bundle(result.output, signing.trust).quantization["full_integer"] is False


def test_an_int8_tflite_model_is_packaged_as_given(signing: Signing, tmp_path: Path) -> None:
    source = build_int8_fc_tflite(tmp_path / "fc_int8.tflite").path
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(4).integers(-100, 100, (32, 8)).astype(np.int8))
    result = compile_model(
        CompileRequest(
            model=source, target="arm64", calibration=tmp_path / "calib.npz", keys=[signing.key_file],
            output=tmp_path / "q.epk",
        )
    )  # fmt: skip
    assert result.precision == "int8" and result.manifest.quantization["tool"] == "quantized before compiling"


def test_accuracy_aware_int8_keeps_the_outlier_ops_in_float(digits: Digits, signing: Signing, tmp_path: Path) -> None:
    """One hidden channel x1000 (float outputs unchanged): per-tensor int8 of that activation crushes the
    other channels and plain int8 loses the classifier; the search keeps its producer and consumer float."""
    from .conftest import outlier_model

    result = compile_model(
        CompileRequest(
            model=outlier_model(tmp_path / "outlier.onnx"), target="rpi4", calibration=digits.calibration,
            validation=digits.validation, keys=[signing.key_file], output=tmp_path / "outlier.epk",
        )
    )  # fmt: skip
    assert result.precision == "int8" and result.accuracy.passed
    tries = result.attempts[0]["tries"]
    assert tries[0]["passed"] is False and tries[-1]["passed"] is True
    assert result.kept_in_float and all(k.reason for k in result.kept_in_float)
    q = result.manifest.quantization
    assert q["full_integer"] is False and q["ops_float"].get("FULLY_CONNECTED", 0) >= 1
    assert len(q["nodes_in_float"]) == len(result.kept_in_float[0].nodes) >= 2  # producer and consumer
