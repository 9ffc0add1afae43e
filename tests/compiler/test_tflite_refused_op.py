"""An op ai-edge-quantizer refuses to quantize (PP-OCRv4 DBNet's TRANSPOSE_CONV bias: "Failed to quantize
bias tensor for op TFLOperationName.CONV_2D_TRANSPOSE with op id 241") is found by its op id, so the LiteRT
int8 search can keep it in float and go on; where that would leave too much in float it falls back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepack.compiler.pipeline import CompileRequest, compile_model
from edgepack.compiler.tflite_graph import describe
from edgepack.compiler.tflite_quantize import _quantizable_ops, _refused_op
from tests.runtimes.conftest import build_fc_tflite

from .conftest import Signing

pytest.importorskip("ai_edge_quantizer")


def test_the_refused_op_is_found_by_its_id_and_kind(tmp_path: Path) -> None:
    info = describe(build_fc_tflite(tmp_path / "fc.tflite").path)
    candidates = _quantizable_ops(info)
    (out,) = info.ops[0].outputs
    message = "ValueError: Failed to quantize bias tensor for op TFLOperationName.FULLY_CONNECTED with op id 0."
    assert _refused_op(info, message, candidates) == (out,)
    assert _refused_op(info, message.replace("FULLY_CONNECTED", "CONV_2D_TRANSPOSE"), candidates) == ()
    assert _refused_op(info, message.replace("op id 0", "op id 7"), candidates) == ()
    assert _refused_op(info, "KeyError: FULLY_CONNECTED", candidates) == ()


def test_a_refusal_that_would_leave_the_model_float_falls_back_with_the_reason(
    signing: Signing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ai_edge_quantizer import quantizer

    calls: list[int] = []

    def refuse(*_args: object, **_kwargs: object) -> None:
        calls.append(1)
        raise ValueError("Failed to quantize bias tensor for op TFLOperationName.FULLY_CONNECTED with op id 0.")

    monkeypatch.setattr(quantizer.Quantizer, "quantize", refuse)
    source = build_fc_tflite(tmp_path / "fc.tflite").path
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(3).normal(0, 1, (64, 8)).astype(np.float32))
    result = compile_model(
        CompileRequest(
            model=source, target="rpi5", calibration=tmp_path / "calib.npz", keys=[signing.key_file],
            output=tmp_path / "fc.epk",
        )
    )  # fmt: skip
    assert result.precision == "fp32" and len(calls) == 1  # the one op is all there is: no float "int8"
    assert "op id 0" in result.attempts[0]["error"]
