"""A ``.tflite`` model compiles for ONNX Runtime targets: tf2onnx (in its managed toolchain) converts it,
and every candidate is judged against LiteRT running the original."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edgepack.bundle import extract_bundle, verify_bundle
from edgepack.compiler.pipeline import CompileRequest, compile_model
from edgepack.compiler.toolchain import Toolchain, find_toolchain, install_toolchain
from edgepack.runtimes.base import RuntimeOptions, get_backend
from edgepack.selftest import run_selftest
from tests.runtimes.conftest import build_fc_tflite

from .conftest import Signing


@pytest.fixture(scope="session")
def tf2onnx_toolchain() -> Toolchain:
    pytest.importorskip("ai_edge_litert", reason="a TFLite source's reference outputs come from LiteRT")
    found = find_toolchain("tf2onnx")
    if found is not None:
        return found
    start = time.perf_counter()
    chain = install_toolchain("tf2onnx")
    print(f"\n[tf2onnx toolchain] installed in {time.perf_counter() - start:.0f} s at {chain.path}")
    return chain


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_tflite_model_compiles_for_x86_checked_against_litert(
    tf2onnx_toolchain: Toolchain, signing: Signing, tmp_path: Path, precision: str
) -> None:
    source = build_fc_tflite(tmp_path / "fc.tflite").path
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calib.npz", x=rng.normal(0, 1, (64, 8)).astype(np.float32))
    result = compile_model(
        CompileRequest(
            model=source, target="x86", calibration=tmp_path / "calib.npz", keys=[signing.key_file],
            output=tmp_path / "fc.epk", precision=precision, max_accuracy_drop=2.0,
        )
    )  # fmt: skip
    assert result.precision == precision and result.accuracy.passed
    assert "reference outputs by litert" in result.accuracy.data
    manifest = verify_bundle(result.output, signing.trust)
    assert manifest.runtime.name == "onnxruntime" and manifest.model_file == "model.onnx"
    assert [s.name for s in manifest.inputs] == ["x"] and [s.name for s in manifest.outputs] == ["y"]
    assert (
        manifest.quantization["source_converter"] == f"tf2onnx {tf2onnx_toolchain.versions['tf2onnx']} (TFLite -> ONNX)"
    )
    bundle = tmp_path / "bundle"
    extract_bundle(result.output, bundle, signing.trust)
    model = get_backend("onnxruntime").load(
        bundle / manifest.model_file,
        inputs=list(manifest.inputs),
        outputs=list(manifest.outputs),
        execution=dict(manifest.execution or {}),
        options=RuntimeOptions(threads=1, allow_accelerators=False),
    )
    try:
        assert run_selftest(model, bundle / "selftest.npz", manifest.selftest.atol, manifest.selftest.rtol).passed
    finally:
        model.close()


def test_a_tflite_file_that_is_not_one_is_refused_before_any_conversion(signing: Signing, tmp_path: Path) -> None:
    from edgepack.errors import ModelLoadError

    bad = tmp_path / "broken.tflite"
    bad.write_bytes(b"\x00\x00\x00\x00TFL3" + b"\x01" * 64)
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 8), np.float32))
    with pytest.raises(ModelLoadError, match="not a TFLite model"):
        compile_model(
            CompileRequest(
                model=bad, target="x86", calibration=tmp_path / "calib.npz", keys=[signing.key_file],
                output=tmp_path / "x.epk",
            )
        )  # fmt: skip
    assert not (tmp_path / "x.epk").exists()
