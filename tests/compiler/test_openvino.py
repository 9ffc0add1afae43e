"""The OpenVINO targets end to end: the sample model compiled for intel-cpu (NNCF int8) verifies, passes its
self-test with OpenVINO here, keeps top-1 on held-out digits and is served by the agent to tritonclient;
a TFLite model compiles; an unconvertible model fails with OpenVINO's reason and the node; intel-gpu/npu
bundles record fp16 and fall back to this host's CPU; the accuracy-aware search keeps an outlier in float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.bundle import extract_bundle, verify_bundle
from edgepack.compiler.pipeline import CompileRequest, compile_model
from edgepack.errors import UnsupportedModelError
from edgepack.manifest import Manifest
from edgepack.runtimes.base import RuntimeOptions, get_backend
from edgepack.selftest import run_selftest

from .conftest import SAMPLE_MODEL, Compile, Digits, Signing, outlier_model, top1

pytest.importorskip("openvino")
pytest.importorskip("nncf")


def _load(bundle_dir: Path, manifest: Manifest, threads: int = 1):
    return get_backend("openvino").load(
        bundle_dir / manifest.model_file,
        inputs=manifest.inputs,
        outputs=manifest.outputs,
        execution=manifest.execution,
        options=RuntimeOptions(threads=threads),
    )


def _selftest_passes(bundle: Path, signing: Signing, tmp_path: Path) -> tuple[Manifest, dict]:
    bundle_dir = tmp_path / bundle.stem
    manifest = extract_bundle(bundle, bundle_dir, signing.trust)
    assert manifest.selftest is not None
    model = _load(bundle_dir, manifest)
    try:
        report = run_selftest(
            model, bundle_dir / manifest.selftest.vectors, manifest.selftest.atol, manifest.selftest.rtol
        )
        described = model.describe()
    finally:
        model.close()
    assert report.passed
    return manifest, described


def test_intel_cpu_int8_bundle_verifies_and_selftest_passes(
    compile_sample: Compile, signing: Signing, tmp_path: Path
) -> None:
    result = compile_sample("intel-cpu")
    assert (result.precision, result.accuracy.passed) == ("int8", True)
    manifest = verify_bundle(result.output, signing.trust)
    assert manifest.runtime.name == "openvino" and manifest.runtime.admits("2026.4.1")
    assert manifest.model_file == "model.xml"
    assert {f.path: f.role for f in manifest.files} == {
        "model.xml": "model",
        "model.bin": "weights",
        "selftest.npz": "selftest",
        "refstats.json": "aux",  # the calibration data's reference statistics, for the device's drift signal
    }
    # the precision it was validated with is pinned: no silent bf16 on the device
    assert manifest.execution == {"precision": "int8", "device": "CPU", "inference_precision": "f32"}
    q = manifest.quantization
    assert q is not None and q["tool"].startswith("nncf") and q["nodes_in_float"] == []
    assert q["speed"]["runtime"] == "openvino" and q["speed"]["fp32_ms"] > 0
    assert manifest.toolchain["openvino"] and manifest.toolchain["nncf"]
    _, described = _selftest_passes(result.output, signing, tmp_path)
    assert described["inference_precision"] == "f32"


def test_intel_cpu_int8_top1_on_held_out_digits_within_one_point_of_fp32(
    compile_sample: Compile, digits: Digits, signing: Signing, tmp_path: Path
) -> None:
    result = compile_sample("intel-cpu")
    bundle_dir = tmp_path / "b"
    manifest = extract_bundle(result.output, bundle_dir, signing.trust)
    test = np.load(digits.test)
    x, y = test["input"], test["labels"]
    model = _load(bundle_dir, manifest)
    try:
        int8 = np.concatenate([model.infer({"input": x[i : i + 1]})["logits"].argmax(-1) for i in range(len(x))])
    finally:
        model.close()
    fp32_acc = float(np.mean(top1(SAMPLE_MODEL, x) == y)) * 100
    int8_acc = float(np.mean(int8 == y)) * 100
    assert fp32_acc > 97.0
    assert abs(fp32_acc - int8_acc) <= 1.0, (fp32_acc, int8_acc)


def test_agent_serves_the_intel_cpu_bundle_to_tritonclient(
    compile_sample: Compile, digits: Digits, signing: Signing, tmp_path: Path
) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    from edgepack.agent.config import load_config
    from edgepack.agent.service import DeviceAgent

    result = compile_sample("intel-cpu")
    config = load_config(
        None,
        {
            "state_dir": str(tmp_path / "state"),
            "trust_dir": str(signing.trust.directory),
            "targets": ["intel-cpu"],
            "listen": "127.0.0.1:0",
        },
    )
    device = DeviceAgent(config)
    device.boot()
    try:
        handle = device.start_api()
        device.install(result.output)
        client = httpclient.InferenceServerClient(handle.url)
        assert client.is_model_ready("digits-cnn")
        test = np.load(digits.test)
        x, y = test["input"][:32], test["labels"][:32]
        predictions = []
        for i in range(len(x)):
            inp = httpclient.InferInput("input", [1, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(x[i : i + 1], binary_data=True)
            out = client.infer("digits-cnn", [inp], outputs=[httpclient.InferRequestedOutput("logits")])
            predictions.append(int(out.as_numpy("logits").argmax()))
        assert np.mean(np.array(predictions) == y) >= 0.95
    finally:
        device.close()


def test_tflite_input_compiles_for_intel_cpu(tmp_path: Path, signing: Signing) -> None:
    from tests.runtimes.conftest import build_fc_tflite

    model = build_fc_tflite(tmp_path / "fc.tflite")
    rng = np.random.default_rng(5)
    data = tmp_path / "x.npz"
    np.savez(data, x=rng.normal(size=(64, 8)).astype(np.float32))
    result = compile_model(
        CompileRequest(
            model=model.path,
            target="intel-cpu",
            calibration=data,
            keys=[signing.key_file],
            output=tmp_path / "fc.epk",
            max_accuracy_drop=5.0,
        )
    )
    assert result.precision in ("int8", "fp32") and result.accuracy.passed
    manifest, _ = _selftest_passes(result.output, signing, tmp_path)
    # the signature keeps the TFLite signature's names, not the converter's tensor names
    assert [i.name for i in manifest.inputs] == ["x"] and [o.name for o in manifest.outputs] == ["y"]
    assert manifest.metadata["source_file"] == "fc.tflite" and manifest.model_file == "model.xml"


def _dynamic_rank_if(path: Path) -> Path:
    """y = flatten(If(sum(x) > 0, x, flatten(x))): the If's branches have ranks 2 and 1."""
    flat = numpy_helper.from_array(np.array([-1], np.int64), "flat")
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"], name="then_id")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Reshape", ["x", "flat"], ["e"], name="else_flatten")],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="positive"),
        helper.make_node(
            "If", ["cond"], ["branch"], then_branch=then_branch, else_branch=else_branch, name="branchy_if"
        ),
        helper.make_node("Reshape", ["branch", "flat"], ["y"], name="out_flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "dynamic_rank_if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.array(0, np.float32), "zero"), flat],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_unconvertible_model_fails_with_openvinos_reason_and_the_node(tmp_path: Path, signing: Signing) -> None:
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))
    request = CompileRequest(
        model=_dynamic_rank_if(tmp_path / "if.onnx"),
        target="intel-cpu",
        precision="fp32",
        calibration=data,
        keys=[signing.key_file],
        output=tmp_path / "if.epk",
    )
    with pytest.raises(UnsupportedModelError) as info:
        compile_model(request)
    message = str(info.value)
    assert "OpenVINO" in message and "dynamic rank" in message, message
    assert "'branchy_if'" in message and "op If" in message, message
    assert not request.output.exists() and not list(tmp_path.glob("*.epk*"))

    # an op OpenVINO has no conversion rule for is named at load time
    custom = helper.make_graph(
        [helper.make_node("Twist", ["x"], ["y"], name="twist0", domain="com.example")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "custom.onnx"
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    onnx.save(helper.make_model(custom, opset_imports=opsets), str(path))
    request.model = path
    with pytest.raises(UnsupportedModelError, match=r"twist0.*com\.example::Twist.*OpenVINO"):
        compile_model(request)
    assert not request.output.exists()


@pytest.mark.parametrize(("target", "device"), [("intel-gpu", "GPU"), ("intel-npu", "NPU")])
def test_gpu_and_npu_bundles_record_fp16_and_fall_back_to_cpu_here(
    compile_sample: Compile, signing: Signing, tmp_path: Path, target: str, device: str
) -> None:
    result = compile_sample(target)
    assert result.precision == "fp16"
    manifest, described = _selftest_passes(result.output, signing, tmp_path)
    assert manifest.execution == {
        "precision": "fp16",
        "device": device,
        "inference_precision": "f16",
        "fallback_device": "CPU",
    }
    assert manifest.quantization is not None and manifest.quantization["weights"] == "f16"
    assert manifest.inputs[0].shape == [1, 1, 8, 8]  # static-shape target: batch fixed to 1
    assert described["device"] == "CPU"  # no GPU/NPU on this host: the backend fell back


def test_accuracy_aware_int8_keeps_the_outlier_in_float(
    compile_sample: Compile, signing: Signing, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # a 10^4 outlier channel: NNCF's plain int8 keeps 10 % top-1 agreement (measured)
    outlier = outlier_model(tmp_path_factory.mktemp("ov-outlier") / "digits_outlier.onnx", factor=1e4)
    result = compile_sample("intel-cpu", "auto", model=outlier)
    assert (result.precision, result.accuracy.passed) == ("int8", True)
    tries = result.attempts[0]["tries"]
    assert tries[0]["passed"] is False and tries[-1]["passed"] is True
    kept = [n for k in result.kept_in_float for n in k.nodes]
    assert any("head.4" in n for n in kept), kept  # the Gemm that reads the outlier channel
    assert 1 <= len(result.kept_in_float) <= 2, result.kept_in_float  # tensors kept float: the convolutions stay int8
    assert all("output SQNR" in k.reason for k in result.kept_in_float)
    manifest = verify_bundle(result.output, signing.trust)
    assert manifest.quantization is not None and manifest.quantization["nodes_in_float"] == kept


def test_nncf_crashing_under_auto_falls_back_to_fp32(
    tmp_path: Path, digits: Digits, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nncf

    def crash(*_args: object, **_kwargs: object) -> None:
        raise ValueError("no quantizer pattern matches this graph")

    monkeypatch.setattr(nncf, "quantize", crash)
    result = compile_model(
        CompileRequest(
            model=SAMPLE_MODEL, target="intel-cpu", calibration=digits.calibration, validation=digits.validation,
            keys=[signing.key_file], output=tmp_path / "fallback.epk",
        )
    )  # fmt: skip
    assert result.precision == "fp32" and result.manifest.runtime.name == "openvino"
    assert "NNCF" in result.attempts[0]["error"] and "no quantizer pattern matches" in result.attempts[0]["error"]
    assert verify_bundle(result.output, signing.trust).runtime.name == "openvino"
