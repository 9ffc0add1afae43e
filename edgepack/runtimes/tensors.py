"""Tensor plumbing every runtime backend shares: dtypes, signature checks, input validation, layouts.

A backend describes its model's own inputs and outputs as :class:`TensorSpec` lists (``native``) and
hands them, with the bundle's specs, to :func:`reconcile_specs`, which refuses a model that does not fit
the manifest. At run time a :class:`SignatureAdapter` checks the caller's arrays against the specs
(:class:`InferenceInputError` names the input, what was expected and what came), moves them into the
model's native layout and moves outputs back, so callers always see the layout the manifest states.

    adapter = SignatureAdapter(inputs, outputs)
    feeds = adapter.to_native(user_arrays)        # validated, transposed where layouts differ
    result = adapter.from_native(runtime_outputs)  # spec layout, in ``outputs`` order
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from edgepack.errors import InferenceInputError, RuntimeBackendError
from edgepack.manifest import TensorSpec

_STRING_KINDS = frozenset("USO")


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a manifest dtype name ("string" maps to object)."""
    if name == "string":
        return np.dtype(object)
    if name == "bfloat16":
        try:
            import ml_dtypes  # optional: only bfloat16 models need it
        except ImportError as exc:
            raise RuntimeBackendError(
                "this model uses bfloat16 tensors, which numpy cannot hold without the ml_dtypes "
                "package; install it with: pip install ml_dtypes"
            ) from exc
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_matches(array: np.ndarray, dtype: str) -> bool:
    """Whether ``array`` holds elements of the manifest dtype ``dtype``."""
    if dtype == "string":
        return array.dtype.kind in _STRING_KINDS
    return array.dtype.name == dtype


def transpose_layout(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """``array`` (axes in ``src`` order, e.g. "NCHW") with its axes moved to ``dst`` order ("NHWC")."""
    if src == dst:
        return array
    _check_layouts(src, dst, array.ndim)
    perm = [src.index(axis) for axis in dst]
    return np.ascontiguousarray(np.transpose(array, perm))


def permute_shape(shape: Sequence[int | str], src: str, dst: str) -> list[int | str]:
    """``shape`` given in ``src`` axis order, reordered to ``dst`` order."""
    if src == dst:
        return list(shape)
    _check_layouts(src, dst, len(shape))
    return [shape[src.index(axis)] for axis in dst]


def layout_change(spec: TensorSpec) -> tuple[str, str] | None:
    """``(layout, native_layout)`` of ``spec`` when the two differ, else None."""
    if spec.layout and spec.native_layout and spec.layout != spec.native_layout:
        return spec.layout, spec.native_layout
    return None


def native_shape(spec: TensorSpec) -> list[int | str]:
    """The shape of ``spec`` in the model's native layout."""
    change = layout_change(spec)
    return permute_shape(spec.shape, *change) if change else list(spec.shape)


def shape_text(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def reconcile_specs(
    role: str,
    given: Sequence[TensorSpec],
    native: Sequence[TensorSpec],
    model_path: Path,
    *,
    dtype_ok: Callable[[TensorSpec, TensorSpec], bool] | None = None,
) -> list[TensorSpec]:
    """The specs a loaded model presents: ``given`` checked against the model's ``native`` ones.

    ``role`` is "input" or "output". With no ``given`` specs the model's own are used. Every given
    input must be one of the model's and every model input must be given; given outputs must be among
    the model's. Ranks, fixed dimensions (after layout conversion) and dtypes must agree; ``dtype_ok``
    lets a backend accept a dtype it converts (a quantized LiteRT tensor behind a float32 spec).
    """
    if not given:
        return list(native)
    by_name = {spec.name: spec for spec in native}
    unknown = [spec.name for spec in given if spec.name not in by_name]
    missing = [] if role == "output" else sorted(set(by_name) - {spec.name for spec in given})
    if unknown or missing:
        raise RuntimeBackendError(
            f"{model_path.name}: the manifest's {role}s {[s.name for s in given]} do not match the "
            f"model's {role}s {list(by_name)}"
            + (f" (not in the model: {unknown})" if unknown else "")
            + (f" (not in the manifest: {missing})" if missing else "")
        )
    check_dtype = dtype_ok or (lambda spec, model: spec.dtype == model.dtype)
    for spec in given:
        _check_spec(role, spec, by_name[spec.name], model_path, check_dtype)
    return list(given)


def _check_spec(
    role: str,
    spec: TensorSpec,
    model: TensorSpec,
    model_path: Path,
    dtype_ok: Callable[[TensorSpec, TensorSpec], bool],
) -> None:
    where = f"{model_path.name}: {role} {spec.name!r}"
    if not dtype_ok(spec, model):
        raise RuntimeBackendError(f"{where} is {model.dtype} in the model but {spec.dtype} in the manifest")
    expected = native_shape(spec)
    if len(expected) != len(model.shape) or any(
        isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(expected, model.shape, strict=True)
    ):
        raise RuntimeBackendError(
            f"{where} has shape {shape_text(model.shape)} in the model but the manifest says "
            f"{shape_text(expected)} (in the model's layout {spec.native_layout or spec.layout or ''})"
        )


class SignatureAdapter:
    """Checks inputs against the specs and converts between the spec and the native layout."""

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self._input_names = {spec.name for spec in self.inputs}

    def validate(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` as numpy arrays, after checking names, dtypes, ranks and fixed dimensions."""
        unknown = sorted(set(feeds) - self._input_names)
        if unknown:
            raise InferenceInputError(f"unknown input(s) {unknown}; the model takes {[s.name for s in self.inputs]}")
        checked: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.name not in feeds:
                raise InferenceInputError(
                    f"missing input {spec.name!r} ({spec.dtype} {shape_text(spec.shape)}); "
                    f"the model takes {[s.name for s in self.inputs]}"
                )
            checked[spec.name] = check_input(spec, feeds[spec.name])
        return checked

    def to_native(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validated ``feeds`` in the model's native layout."""
        checked = self.validate(feeds)
        return {spec.name: _to_native(spec, checked[spec.name]) for spec in self.inputs}

    def from_native(self, results: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The runtime's ``results`` in the spec layout and in ``outputs`` order."""
        out: dict[str, np.ndarray] = {}
        for spec in self.outputs:
            change = layout_change(spec)
            array = results[spec.name]
            out[spec.name] = transpose_layout(array, change[1], change[0]) if change else array
        return out


def check_input(spec: TensorSpec, value: object) -> np.ndarray:
    """``value`` as an array that fits ``spec``; InferenceInputError says what does not."""
    if not isinstance(value, np.ndarray):
        raise InferenceInputError(
            f"input {spec.name!r} must be a numpy array of {spec.dtype}, got {type(value).__name__}"
        )
    if not dtype_matches(value, spec.dtype):
        raise InferenceInputError(
            f"input {spec.name!r} has dtype {value.dtype}, expected {spec.dtype} "
            f"(shape expected {shape_text(spec.shape)}, received {shape_text(value.shape)})"
        )
    rank_ok = value.ndim == len(spec.shape)
    if not rank_ok or any(isinstance(d, int) and d != n for d, n in zip(spec.shape, value.shape, strict=True)):
        raise InferenceInputError(
            f"input {spec.name!r} has shape {shape_text(value.shape)}, expected {shape_text(spec.shape)} "
            f"({spec.dtype}; named dimensions may take any size)"
        )
    return value


def _to_native(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    change = layout_change(spec)
    return transpose_layout(array, *change) if change else array


def _check_layouts(src: str, dst: str, ndim: int) -> None:
    if sorted(src) != sorted(dst) or len(set(src)) != len(src) or len(src) != ndim:
        raise RuntimeBackendError(
            f"cannot convert layout {src!r} to {dst!r} for a tensor of rank {ndim}: "
            "layouts must name the same distinct axes, one letter per dimension"
        )
