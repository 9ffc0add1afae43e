"""The LiteRT backend on .tflite files written in conftest: float, int8-quantized, NHWC."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edgepack.errors import InferenceInputError, RuntimeBackendError
from edgepack.manifest import TensorSpec
from edgepack.runtimes import RuntimeOptions, get_backend

pytest.importorskip("ai_edge_litert", reason="install edgepack[agent-litert] to test the LiteRT backend")

X = TensorSpec(name="x", dtype="float32", shape=[1, 8])
Y = TensorSpec(name="y", dtype="float32", shape=[1, 4])
IMAGE = TensorSpec(name="image", dtype="float32", shape=[1, 3, 4, 4], layout="NCHW", native_layout="NHWC")
SHIFTED = IMAGE.model_copy(update={"name": "shifted"})


def _load(path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], threads: int | None = None):
    return get_backend("litert").load(
        path, inputs=inputs, outputs=outputs, execution={}, options=RuntimeOptions(threads=threads)
    )


def _fc_reference(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ weights["w"].T + weights["b"]


def test_float_model_matches_reference_by_signature_names(fc_tflite) -> None:
    model = _load(fc_tflite.path, [X], [Y], threads=2)
    x = np.random.default_rng(1).normal(size=(1, 8)).astype(np.float32)
    out = model.infer({"x": x})
    assert out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], _fc_reference(fc_tflite.weights, x), rtol=1e-5, atol=1e-5)
    info = model.describe()
    assert info["threads"] == 2 and info["quantized_inputs"] == []
    # what the loaded graph shows: XNNPACK took the FULLY_CONNECTED over (one DELEGATE node)
    assert (info["delegate"], info["delegate_nodes"], info["model_ops"]) == ("xnnpack", 1, 1)
    model.close()
    with pytest.raises(RuntimeBackendError, match="closed"):
        model.infer({"x": x})


def test_specs_come_from_the_model_when_none_are_given(fc_tflite) -> None:
    model = _load(fc_tflite.path, [], [])
    # the converter-style tensor names are replaced by the signature's
    assert [(s.name, s.dtype, s.shape) for s in model.inputs] == [("x", "float32", [1, 8])]
    assert [s.name for s in model.outputs] == ["y"]


def test_int8_model_quantizes_inputs_and_dequantizes_outputs(int8_fc_tflite) -> None:
    model = _load(int8_fc_tflite.path, [X], [Y])
    assert model.inputs[0].dtype == "float32"
    x = np.random.default_rng(2).uniform(-1, 1, size=(1, 8)).astype(np.float32)
    got = model.infer({"x": x})["y"]
    assert got.dtype == np.float32
    # one output step (0.05) plus the input's rounding (8 weights of <= 1 times 0.01)
    np.testing.assert_allclose(got, _fc_reference(int8_fc_tflite.weights, x), atol=0.05 + 0.08)
    assert model.describe()["quantized_inputs"] == ["x"]
    assert model.describe()["quantized_outputs"] == ["y"]


def test_int8_model_with_int8_specs_passes_integers_through(int8_fc_tflite) -> None:
    xq, yq = X.model_copy(update={"dtype": "int8"}), Y.model_copy(update={"dtype": "int8"})
    model = _load(int8_fc_tflite.path, [xq], [yq])
    out = model.infer({"x": np.zeros((1, 8), np.int8)})["y"]
    assert out.dtype == np.int8
    with pytest.raises(InferenceInputError, match="has dtype float32, expected int8"):
        model.infer({"x": np.zeros((1, 8), np.float32)})


def test_nchw_spec_is_transposed_to_the_native_nhwc(nhwc_add_tflite) -> None:
    model = _load(nhwc_add_tflite.path, [IMAGE], [SHIFTED])
    assert model.inputs[0].shape == [1, 3, 4, 4] and model.inputs[0].layout == "NCHW"
    x = np.random.default_rng(3).random((1, 3, 4, 4), dtype=np.float32)
    out = model.infer({"image": x})["shifted"]
    np.testing.assert_allclose(out, x + nhwc_add_tflite.weights["bias"][None, :, None, None], rtol=1e-6)
    with pytest.raises(InferenceInputError, match=r"shape \[1, 4, 4, 3\], expected \[1, 3, 4, 4\]"):
        model.infer({"image": np.zeros((1, 4, 4, 3), np.float32)})


def test_layout_that_does_not_fit_the_model_is_refused(nhwc_add_tflite) -> None:
    wrong = IMAGE.model_copy(update={"shape": [1, 4, 4, 3], "layout": "NHWC", "native_layout": "NCHW"})
    with pytest.raises(RuntimeBackendError, match=r"shape \[1, 4, 4, 3\] in the model"):
        _load(nhwc_add_tflite.path, [wrong], [SHIFTED])


def test_infer_is_thread_safe(fc_tflite) -> None:
    model = _load(fc_tflite.path, [X], [Y])
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=(1, 8)).astype(np.float32) for _ in range(64)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda x: model.infer({"x": x})["y"], xs))
    for x, got in zip(xs, results, strict=True):
        np.testing.assert_allclose(got, _fc_reference(fc_tflite.weights, x), rtol=1e-5, atol=1e-5)


def test_unloadable_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(RuntimeBackendError, match=r"LiteRT cannot load junk\.tflite"):
        _load(junk, [], [])
    with pytest.raises(RuntimeBackendError, match="does not exist"):
        _load(tmp_path / "missing.tflite", [], [])
