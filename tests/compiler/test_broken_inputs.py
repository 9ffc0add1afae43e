"""Broken inputs end in a short error and exit code 2, never a traceback; odd but valid inputs compile.

The corpus is :mod:`tests.compiler.broken_inputs`. Also: a model whose input shares one dim_param name
over several positions (PaddlePaddle's ``[-1, 3, '?', '?']``) takes ``--input-shape`` position by position,
and a tool failing in a way no step foresaw becomes an error naming the step and the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgepack.bundle import verify_bundle
from edgepack.cli import app
from edgepack.compiler.pipeline import CompileRequest, compile_model
from edgepack.errors import CompileError

from .broken_inputs import Case, build, ocr_classifier
from .conftest import SAMPLE_MODEL, Digits, Signing


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return {case.name: case for case in build(tmp_path_factory.mktemp("broken"))}


_NAMES = [
    "truncated file",
    "random bytes",
    "missing initializer",
    "opset too old",
    "opset from the future",
    "dimension of 0",
    "--input-shape of the wrong rank",
    "non-finite weights",
    "calibration of the wrong shape",
    "calibration of the wrong dtype",
    "--input-shape against a fixed dimension of the shared-name model",
]


@pytest.mark.parametrize("name", _NAMES)
def test_a_broken_input_exits_2_with_a_short_reason(
    name: str, corpus: dict[str, Case], signing: Signing, tmp_path: Path
) -> None:
    case = corpus[name]
    out = tmp_path / "out.epk"
    args = ["compile", str(case.model), "-t", "x86", "-c", str(case.calibration), "-k", str(signing.key_file)]
    result = CliRunner().invoke(app, [*args, "-o", str(out), *case.args], env={"COLUMNS": "300"})
    output = " ".join(result.output.split())
    assert result.exit_code == 2, (result.exit_code, output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    message = output[output.index("error:") :]
    for fragment in case.fragments:
        assert fragment in message, message
    assert len(message) < 600, message
    assert not out.exists()


def test_the_corpus_covers_every_case(corpus: dict[str, Case]) -> None:
    assert sorted(corpus) == sorted(_NAMES)


@pytest.mark.parametrize("target", ["x86", "intel-cpu"])
def test_an_input_whose_dims_share_one_name_is_fixed_position_by_position(
    target: str, signing: Signing, tmp_path: Path
) -> None:
    model = ocr_classifier(tmp_path / "ocr_cls.onnx")
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, x=np.random.default_rng(0).random((8, 3, 48, 192), dtype=np.float32))
    out = tmp_path / "ocr.epk"
    args = ["compile", str(model), "-t", target, "-c", str(calibration), "-k", str(signing.key_file), "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--input-shape", "x=1,3,48,192", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    manifest = verify_bundle(out, signing.trust)
    assert [list(i.shape) for i in manifest.inputs] == [[1, 3, 48, 192]]
    assert manifest.metadata["fixed_shapes"] == {"x": [1, 3, 48, 192]}


def test_an_unforeseen_tool_failure_names_the_step_and_the_model(
    tmp_path: Path, digits: Digits, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgepack.compiler import pipeline

    def crash(*_args: object, **_kwargs: object) -> None:
        raise IndexError("list index out of range")

    monkeypatch.setattr(pipeline, "write_selftest", crash)
    request = CompileRequest(
        model=SAMPLE_MODEL,
        target="x86",
        precision="fp32",
        calibration=digits.calibration,
        keys=[signing.key_file],
        output=tmp_path / "out.epk",
    )
    with pytest.raises(CompileError) as info:
        compile_model(request)
    message = str(info.value)
    assert "step 'self-test vectors' failed on digits_cnn.onnx" in message
    assert "IndexError: list index out of range" in message and "--verbose" in message
    assert not (tmp_path / "out.epk").exists()


def test_an_unforeseen_int8_failure_under_auto_falls_back_and_says_why(
    tmp_path: Path, digits: Digits, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgepack.compiler import onnxruntime_convert

    def crash(*_args: object, **_kwargs: object) -> None:
        raise KeyError("scale")

    monkeypatch.setattr(onnxruntime_convert, "search_int8", crash)
    request = CompileRequest(
        model=SAMPLE_MODEL,
        target="x86",
        calibration=digits.calibration,
        keys=[signing.key_file],
        output=tmp_path / "out.epk",
    )
    result = compile_model(request)
    assert result.precision == "fp32"
    error = result.attempts[0]["error"]
    assert "step 'quantize int8 (accuracy-aware)' failed on digits_cnn.onnx: KeyError" in error
    assert "--precision fp32" in error
