"""Shared tensor plumbing: layout transposition, input validation, manifest-vs-model reconciliation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepack.errors import InferenceInputError, RuntimeBackendError
from edgepack.manifest import TensorSpec
from edgepack.runtimes.tensors import (
    SignatureAdapter,
    native_shape,
    permute_shape,
    reconcile_specs,
    transpose_layout,
)

IMAGE = TensorSpec(name="image", dtype="float32", shape=["batch", 3, 4, 5], layout="NCHW", native_layout="NHWC")
SCORES = TensorSpec(name="scores", dtype="float32", shape=["batch", 3, 4, 5], layout="NCHW", native_layout="NHWC")


def test_transpose_layout_round_trips() -> None:
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    nhwc = transpose_layout(x, "NCHW", "NHWC")
    assert nhwc.shape == (2, 4, 5, 3)
    assert nhwc[1, 2, 3, 0] == x[1, 0, 2, 3]
    assert nhwc.flags.c_contiguous
    np.testing.assert_array_equal(transpose_layout(nhwc, "NHWC", "NCHW"), x)
    assert transpose_layout(x, "NCHW", "NCHW") is x


@pytest.mark.parametrize(("src", "dst"), [("NCHW", "NHW"), ("NCHW", "NCHX"), ("NCCW", "NCWC"), ("NCW", "NWC")])
def test_transpose_layout_refuses_mismatched_layouts(src: str, dst: str) -> None:
    with pytest.raises(RuntimeBackendError, match="cannot convert layout"):
        transpose_layout(np.zeros((1, 2, 3, 4)), src, dst)


def test_native_shape_follows_the_native_layout() -> None:
    assert permute_shape(["batch", 3, 4, 5], "NCHW", "NHWC") == ["batch", 4, 5, 3]
    assert native_shape(IMAGE) == ["batch", 4, 5, 3]
    assert native_shape(TensorSpec(name="x", dtype="int8", shape=[1, 2])) == [1, 2]


def test_adapter_converts_layouts_both_ways() -> None:
    adapter = SignatureAdapter([IMAGE], [SCORES])
    x = np.random.default_rng(0).random((2, 3, 4, 5), dtype=np.float32)
    native = adapter.to_native({"image": x})
    assert native["image"].shape == (2, 4, 5, 3)
    back = adapter.from_native({"scores": native["image"]})
    np.testing.assert_array_equal(back["scores"], x)


@pytest.mark.parametrize(
    ("feeds", "expected"),
    [
        ({}, r"missing input 'image' \(float32 \[batch, 3, 4, 5\]\)"),
        ({"image": np.zeros((1, 3, 4, 5), np.float32), "mask": np.zeros(1)}, r"unknown input\(s\) \['mask'\]"),
        (
            {"image": np.zeros((1, 3, 4, 5), np.float64)},
            r"input 'image' has dtype float64, expected float32 \(shape expected \[batch, 3, 4, 5\], "
            r"received \[1, 3, 4, 5\]\)",
        ),
        (
            {"image": np.zeros((3, 4, 5), np.float32)},
            r"input 'image' has shape \[3, 4, 5\], expected \[batch, 3, 4, 5\]",
        ),
        (
            {"image": np.zeros((1, 4, 5, 3), np.float32)},
            r"input 'image' has shape \[1, 4, 5, 3\], expected \[batch, 3, 4, 5\]",
        ),
        ({"image": [[1.0]]}, r"input 'image' must be a numpy array of float32, got list"),
    ],
)
def test_adapter_names_what_is_wrong(feeds: dict, expected: str) -> None:
    with pytest.raises(InferenceInputError, match=expected):
        SignatureAdapter([IMAGE], [SCORES]).to_native(feeds)


def test_named_dimensions_take_any_size() -> None:
    adapter = SignatureAdapter([IMAGE], [SCORES])
    for batch in (1, 7):
        assert adapter.validate({"image": np.zeros((batch, 3, 4, 5), np.float32)})["image"].shape[0] == batch


def test_string_inputs_accept_str_and_object_arrays() -> None:
    spec = TensorSpec(name="text", dtype="string", shape=[2])
    adapter = SignatureAdapter([spec], [])
    adapter.validate({"text": np.array(["a", "b"])})
    adapter.validate({"text": np.array(["a", "b"], dtype=object)})
    with pytest.raises(InferenceInputError, match="dtype int64"):
        adapter.validate({"text": np.array([1, 2])})


def test_reconcile_uses_the_model_specs_when_none_are_given() -> None:
    native = [TensorSpec(name="x", dtype="float32", shape=["?", 4])]
    assert reconcile_specs("input", [], native, Path("m.onnx")) == native


def test_reconcile_refuses_a_model_that_does_not_fit_the_manifest() -> None:
    native = [TensorSpec(name="image", dtype="float32", shape=[1, 4, 5, 3])]
    assert reconcile_specs("input", [IMAGE], native, Path("m.tflite")) == [IMAGE]
    with pytest.raises(RuntimeBackendError, match=r"not in the model: \['pixels'\]"):
        reconcile_specs("input", [IMAGE.model_copy(update={"name": "pixels"})], native, Path("m.tflite"))
    with pytest.raises(RuntimeBackendError, match="is float32 in the model but int8 in the manifest"):
        reconcile_specs("input", [IMAGE.model_copy(update={"dtype": "int8"})], native, Path("m.tflite"))
    with pytest.raises(RuntimeBackendError, match=r"shape \[1, 4, 5, 3\] in the model .* \[batch, 5, 4, 3\]"):
        reconcile_specs("input", [IMAGE.model_copy(update={"shape": ["batch", 3, 5, 4]})], native, Path("m"))
    extra = [*native, TensorSpec(name="mask", dtype="bool", shape=[1])]
    with pytest.raises(RuntimeBackendError, match=r"not in the manifest: \['mask'\]"):
        reconcile_specs("input", [IMAGE], extra, Path("m.tflite"))
    # outputs may be a subset of the model's
    assert reconcile_specs("output", [IMAGE], extra, Path("m.tflite")) == [IMAGE]
