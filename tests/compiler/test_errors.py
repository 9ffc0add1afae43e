"""Bad input gets a clear error and leaves no output file behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgepack.compiler.pipeline import CompileRequest, compile_model
from edgepack.errors import ConfigError, DataError, ModelLoadError, QuantizerError, UnsupportedModelError

from .conftest import SAMPLE_MODEL, Digits, Signing


def _request(tmp_path: Path, digits: Digits, signing: Signing, **overrides: object) -> CompileRequest:
    fields: dict[str, object] = {
        "model": SAMPLE_MODEL,
        "target": "x86",
        "calibration": digits.calibration,
        "keys": [signing.key_file],
        "output": tmp_path / "out.epk",
    }
    fields.update(overrides)
    return CompileRequest(**fields)  # type: ignore[arg-type]


def _fails(request: CompileRequest, error: type[Exception], *fragments: str) -> str:
    with pytest.raises(error) as info:
        compile_model(request)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not Path(request.output).exists(), "a failed compile left an output file"
    assert not list(Path(request.output).parent.glob("*.epk*")), "a failed compile left a temporary file"
    return message


def _tiny_model(path: Path, node: onnx.NodeProto, in_shape: list, out_shape: list, extra_opsets=()) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    graph = helper.make_graph([node], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *extra_opsets])
    onnx.save(model, str(path))
    return path


def test_not_an_onnx_file(tmp_path: Path, digits: Digits, signing: Signing) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_text("this is not a model\n")
    _fails(_request(tmp_path, digits, signing, model=bogus), ModelLoadError, "is not an ONNX", "model.onnx")


def test_missing_model_file(tmp_path: Path, digits: Digits, signing: Signing) -> None:
    _fails(_request(tmp_path, digits, signing, model=tmp_path / "nope.onnx"), ModelLoadError, "does not exist")


def test_invalid_graph(tmp_path: Path, digits: Digits, signing: Signing) -> None:
    # Relu with two inputs: parses as ONNX, fails the checker
    node = helper.make_node("Relu", ["x", "x"], ["y"], name="relu0")
    model = _tiny_model(tmp_path / "broken.onnx", node, [1, 4], [1, 4])
    _fails(_request(tmp_path, digits, signing, model=model), ModelLoadError, "not a valid ONNX graph")


def test_op_the_target_cannot_run_names_node_and_op(tmp_path: Path, digits: Digits, signing: Signing) -> None:
    node = helper.make_node("Twist", ["x"], ["y"], name="twist0", domain="com.example")
    model = _tiny_model(tmp_path / "custom.onnx", node, [1, 4], [1, 4], [helper.make_opsetid("com.example", 1)])
    _fails(_request(tmp_path, digits, signing, model=model), UnsupportedModelError, "twist0", "com.example::Twist")


def test_dynamic_shape_without_fix_on_static_target(tmp_path: Path, digits: Digits, signing: Signing) -> None:
    node = helper.make_node("Relu", ["x"], ["y"], name="relu0")
    model = _tiny_model(tmp_path / "dyn.onnx", node, [1, 1, "height", "width"], [1, 1, "height", "width"])
    message = _fails(
        _request(tmp_path, digits, signing, model=model, target="jetson"),
        UnsupportedModelError,
        "input 'x'",
        "height",
        "--input-shape x=1,1,N,N",
    )
    assert "static shapes" in message


def test_input_shape_flag_that_does_not_fit(tmp_path: Path, digits: Digits, signing: Signing) -> None:
    _fails(
        _request(tmp_path, digits, signing, input_shapes={"input": [1, 3, 8, 8]}),
        ConfigError,
        "dimension 1 of input 'input' is fixed at 1",
    )
    _fails(_request(tmp_path, digits, signing, input_shapes={"image": [1, 1, 8, 8]}), ConfigError, "'image'")


def test_calibration_of_the_wrong_shape(tmp_path: Path, digits: Digits, signing: Signing) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((16, 8, 8), np.float32))
    _fails(
        _request(tmp_path, digits, signing, calibration=bad),
        DataError,
        "calibration data",
        "input 'input'",
        "[batch, 1, 8, 8]",
        "found float32 [16, 8, 8]",
    )


def test_calibration_of_the_wrong_dtype(tmp_path: Path, digits: Digits, signing: Signing) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((16, 1, 8, 8), np.int64))
    _fails(_request(tmp_path, digits, signing, calibration=bad), DataError, "expected dtype float32, found int64")


def test_calibration_missing_an_input(tmp_path: Path, digits: Digits, signing: Signing) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((16, 1, 8, 8), np.float32))
    _fails(_request(tmp_path, digits, signing, calibration=bad), DataError, "lacks input(s) 'input'", "found image")


def test_precision_the_target_lacks(tmp_path: Path, digits: Digits, signing: Signing) -> None:
    _fails(_request(tmp_path, digits, signing, target="jetson-nano", precision="int8"), ConfigError, "fp16, fp32")


def test_unknown_target(tmp_path: Path, digits: Digits, signing: Signing) -> None:
    _fails(_request(tmp_path, digits, signing, target="toaster"), ConfigError, "unknown target 'toaster'", "x86")


def test_failed_compile_keeps_an_existing_output(tmp_path: Path, digits: Digits, signing: Signing) -> None:
    out = tmp_path / "out.epk"
    out.write_bytes(b"previous bundle")
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((4, 2, 8, 8), np.float32))
    with pytest.raises(DataError):
        compile_model(_request(tmp_path, digits, signing, calibration=bad))
    assert out.read_bytes() == b"previous bundle"


# --- the quantizer itself fails --------------------------------------------------------------------


def _quantize_static_crashes(*_args: object, **_kwargs: object) -> None:
    raise RuntimeError("calibration blew up inside the tool")


def test_a_crashing_quantizer_under_auto_falls_back_to_float(
    tmp_path: Path, digits: Digits, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime.quantization

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", _quantize_static_crashes)
    result = compile_model(_request(tmp_path, digits, signing, validation=digits.validation))
    assert result.precision == "fp32" and result.requested_precision == "auto" and result.accuracy.passed
    failed = result.attempts[0]
    assert failed["precision"] == "int8" and failed["passed"] is False
    assert "onnxruntime" in failed["error"] and "calibration blew up inside the tool" in failed["error"]
    assert result.manifest.accuracy["attempts"][0]["error"] == failed["error"]


def test_a_crashing_quantizer_is_the_error_when_int8_was_asked_for(
    tmp_path: Path, digits: Digits, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime.quantization

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", _quantize_static_crashes)
    _fails(
        _request(tmp_path, digits, signing, precision="int8"),
        QuantizerError,
        "onnxruntime",
        "RuntimeError: calibration blew up inside the tool",
        "--precision fp32",
    )


def test_int8_slower_than_fp32_is_kept_with_a_warning_when_asked_and_auto_picks_fp32(
    tmp_path: Path, digits: Digits, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's rule: ``auto`` wants the target's best, and int8 that runs no faster than fp32 (the compile's
    own measurement) is not it, so auto takes fp32 and says why; an explicit int8 is kept, with the warning.
    The timing itself is faked."""
    from typer.testing import CliRunner

    from edgepack.cli import app
    from edgepack.compiler import pipeline

    def slow(*_args: object) -> dict[str, object]:
        return {"fp32_ms": 1.0, "compiled_ms": 2.0, "speedup_1_thread": 0.5, "runtime": "onnxruntime"}

    monkeypatch.setattr(pipeline, "_speed", slow)
    result = compile_model(_request(tmp_path, digits, signing, validation=digits.validation, precision="int8"))
    assert result.precision == "int8" and result.speed is not None
    assert "int8 runs slower than fp32 on this host (0.50x" in result.speed["warning"]
    assert "--precision fp32" in result.speed["warning"]
    assert result.manifest.quantization["speed"]["warning"] == result.speed["warning"]

    auto = compile_model(_request(tmp_path, digits, signing, validation=digits.validation))
    assert auto.precision == "fp32" and auto.requested_precision == "auto" and auto.accuracy.passed
    assert auto.attempts[0]["precision"] == "int8" and auto.attempts[0]["passed"] is True
    assert "runs at 0.50x fp32 on this host" in auto.attempts[0]["rejected"]
    assert "auto picked fp32" in auto.attempts[0]["rejected"]
    assert auto.manifest.accuracy["attempts"][0]["rejected"] == auto.attempts[0]["rejected"]
    printed = CliRunner().invoke(
        app,
        ["compile", str(SAMPLE_MODEL), "--target", "x86", "--calibration", str(digits.calibration),
         "--key", str(signing.key_file), "-o", str(tmp_path / "cli.epk")],
    )  # fmt: skip
    assert printed.exit_code == 0, printed.output
    text = " ".join(printed.output.split())
    assert "at fp32 (asked: auto)" in text and "tried int8 first: int8 passes the bar but runs at 0.50x" in text
