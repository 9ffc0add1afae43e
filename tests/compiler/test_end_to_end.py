"""End to end on the committed sample model: compile for every ONNX Runtime target, then check the bundle
verifies, its self-test passes with onnxruntime on this host, and int8 keeps top-1 on held-out digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepack.bundle import extract_bundle, verify_bundle
from edgepack.runtimes.base import RuntimeOptions, get_backend
from edgepack.selftest import run_selftest

from .conftest import Compile, Digits, Signing, top1

CASES = [
    ("x86", "auto", "int8"),
    ("jetson", "auto", "fp16"),
    ("nvidia-gpu", "auto", "fp16"),
    ("jetson-xavier", "fp16", "fp16"),
    ("jetson-nano", "auto", "fp16"),
    ("jetson-orin", "int8", "int8"),
    ("x86", "fp32", "fp32"),
]


@pytest.mark.parametrize(("target", "precision", "expected"), CASES)
def test_bundle_verifies_and_selftest_passes_on_this_host(
    compile_sample: Compile, signing: Signing, tmp_path: Path, target: str, precision: str, expected: str
) -> None:
    result = compile_sample(target, precision)
    assert result.precision == expected
    assert result.accuracy.passed

    manifest = verify_bundle(result.output, signing.trust)
    assert manifest.name == "digits-cnn" and manifest.version == "0.1.0"
    assert manifest.target == result.target
    assert manifest.runtime.name == "onnxruntime"
    assert manifest.metadata["labels"] == [str(d) for d in range(10)]
    assert manifest.accuracy and manifest.accuracy["passed"] is True
    assert manifest.selftest is not None and manifest.selftest.samples == 8

    bundle_dir = tmp_path / "bundle"
    extract_bundle(result.output, bundle_dir, signing.trust)
    model = get_backend("onnxruntime").load(
        bundle_dir / manifest.model_file,
        inputs=manifest.inputs,
        outputs=manifest.outputs,
        execution=manifest.execution,
        options=RuntimeOptions(threads=1),
    )
    try:
        report = run_selftest(
            model, bundle_dir / manifest.selftest.vectors, manifest.selftest.atol, manifest.selftest.rtol
        )
    finally:
        model.close()
    assert report.passed


def test_gpu_targets_record_the_tensorrt_plan(compile_sample: Compile) -> None:
    manifest = compile_sample("jetson").manifest
    providers = [p["name"] for p in manifest.execution["providers"]]
    assert providers == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = manifest.execution["providers"][0]["options"]
    assert trt["trt_fp16_enable"] is True and trt["trt_int8_enable"] is False
    assert trt["trt_engine_cache_enable"] and trt["trt_timing_cache_enable"]
    digest = manifest.file(manifest.model_file).sha256
    assert digest[:16] in trt["trt_engine_cache_path"]
    assert "{trt_version}" in trt["trt_engine_cache_path"] and "{gpu}" in trt["trt_engine_cache_path"]
    # a static-shape target got its dynamic batch fixed to 1
    assert manifest.inputs[0].shape == [1, 1, 8, 8]
    assert compile_sample("jetson-orin", "int8").manifest.execution["providers"][0]["options"]["trt_int8_enable"]


def test_x86_plan_is_cpu_and_keeps_dynamic_batch(compile_sample: Compile) -> None:
    manifest = compile_sample("x86").manifest
    assert [p["name"] for p in manifest.execution["providers"]] == ["CPUExecutionProvider"]
    assert manifest.inputs[0].shape[0] == "batch"
    q = manifest.quantization
    assert q is not None
    assert (q["format"], q["activation_type"], q["weight_type"], q["per_channel"]) == ("QDQ", "uint8", "int8", True)
    assert q["reduce_range"] is True
    assert q["nodes_in_float"] == []
    assert q["speed"]["fp32_ms"] > 0


@pytest.mark.parametrize("target", ["x86", "jetson-orin"])
def test_int8_top1_on_held_out_digits_within_one_point_of_fp32(
    compile_sample: Compile, digits: Digits, signing: Signing, tmp_path: Path, target: str
) -> None:
    from .conftest import SAMPLE_MODEL

    result = compile_sample(target, "int8" if target != "x86" else "auto")
    assert result.precision == "int8"
    bundle_dir = tmp_path / "b"
    manifest = extract_bundle(result.output, bundle_dir, signing.trust)
    test = np.load(digits.test)
    x, y = test["input"], test["labels"]
    fp32_acc = float(np.mean(top1(SAMPLE_MODEL, x) == y)) * 100
    int8_acc = float(np.mean(top1(bundle_dir / manifest.model_file, x, manifest.execution) == y)) * 100
    assert fp32_acc > 97.0
    assert abs(fp32_acc - int8_acc) <= 1.0, (fp32_acc, int8_acc)
