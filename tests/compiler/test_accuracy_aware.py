"""Accuracy-aware int8: a model that plain int8 breaks ends with nodes kept in float and passes the bar."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.bundle import verify_bundle
from edgepack.compiler.accuracy_aware import search_int8
from edgepack.compiler.compare import AccuracyBar, compare_outputs
from edgepack.compiler.family import HostModel, run_host_model
from edgepack.compiler.load import load_model
from edgepack.compiler.quantize_ort import Int8Settings
from edgepack.compiler.runner import CPU_PLAN
from edgepack.datasets import load_samples
from edgepack.errors import AccuracyError
from edgepack.targets.registry import get_target

from .conftest import SAMPLE_MODEL, Compile, Digits, Signing, outlier_model


@pytest.fixture(scope="module")
def outlier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return outlier_model(tmp_path_factory.mktemp("outlier") / "digits_outlier.onnx")


def test_plain_int8_breaks_the_outlier_model(outlier: Path, digits: Digits, tmp_path: Path) -> None:
    source = load_model(outlier, get_target("x86"))
    calibration = load_samples(digits.calibration, source.inputs)
    validation = load_samples(digits.validation, source.inputs)
    reference = run_host_model(
        HostModel(outlier, "onnxruntime", CPU_PLAN), source.inputs, source.outputs, validation.feeds
    )

    def evaluate(path: Path):
        got = run_host_model(HostModel(path, "onnxruntime", CPU_PLAN), source.inputs, source.outputs, validation.feeds)
        return compare_outputs(reference, got, source.outputs, labels=validation.labels, bar=AccuracyBar())

    plain = search_int8(
        outlier,
        tmp_path,
        calibration=calibration.feeds,
        analysis_feeds=calibration.feeds[:16],
        settings=Int8Settings(),
        evaluate=evaluate,
        adaptive=False,
    )
    assert plain.model is None
    assert plain.report is not None and not plain.report.passed
    assert plain.report.outputs[0].top1_agreement < 90


def test_auto_keeps_the_outlier_nodes_in_float_and_passes(
    compile_sample: Compile, outlier: Path, signing: Signing
) -> None:
    result = compile_sample("x86", "auto", model=outlier)
    assert result.precision == "int8"
    assert result.accuracy.passed
    kept = [n for k in result.kept_in_float for n in k.nodes]
    assert kept, "expected nodes kept in float"
    assert any("Gemm" in n for n in kept)
    assert all("SQNR" in k.reason for k in result.kept_in_float)
    # the first try (plain int8) failed, a later one passed
    tries = result.attempts[0]["tries"]
    assert tries[0]["passed"] is False and tries[-1]["passed"] is True
    manifest = verify_bundle(result.output, signing.trust)
    assert manifest.quantization is not None
    assert manifest.quantization["nodes_in_float"] == kept
    assert manifest.quantization["kept_in_float"][0]["reason"]
    assert manifest.quantization["speed"]["speedup_1_thread"] > 0
    # still mostly int8: the convolutions stay quantized
    assert len(kept) < 6


def test_explicit_int8_that_cannot_pass_fails_with_the_numbers(
    digits: Digits, signing: Signing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgepack.compiler import onnxruntime_convert, pipeline
    from edgepack.compiler.accuracy_aware import Int8Outcome

    def hopeless(fp32_model: Path, workdir: Path, *, evaluate, settings, **_: object) -> Int8Outcome:
        report = evaluate(fp32_model)
        report.failures = ["logits: top-1 agreement 42.00% < 99.00%"]
        return Int8Outcome(None, settings, report, [], [{"step": 0, "passed": False}])

    monkeypatch.setattr(onnxruntime_convert, "search_int8", hopeless)
    request = pipeline.CompileRequest(
        model=SAMPLE_MODEL,
        target="x86",
        precision="int8",
        calibration=digits.calibration,
        validation=digits.validation,
        keys=[signing.key_file],
        output=tmp_path / "out.epk",
    )
    with pytest.raises(AccuracyError) as info:
        pipeline.compile_model(request)
    message = str(info.value)
    assert "int8" in message and "42.00%" in message and "--max-accuracy-drop" in message
    assert not (tmp_path / "out.epk").exists()
    # auto on the same target falls back to fp32 instead of failing
    request.precision = "auto"
    result = pipeline.compile_model(request)
    assert result.precision == "fp32"
    assert [a["precision"] for a in result.attempts] == ["int8", "fp32"]
