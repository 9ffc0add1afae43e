"""Check an inference request against a model's signature before any tensor is decoded or run.

Every message names the tensor and says what the model expects and what the request gave, so a client
can fix its call from the error alone. Failures raise :class:`~edgepack.errors.InferenceInputError`, the
same class runtime backends raise when inputs do not fit, so the transport maps both to 400.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgepack.agent.api.codec import RequestedOutput, RequestInput
from edgepack.agent.api.datatypes import kserve_datatype
from edgepack.errors import InferenceInputError
from edgepack.manifest import TensorSpec

__all__ = ["check_inputs", "check_outputs", "describe_shape"]


def describe_shape(shape: Sequence[int | str]) -> str:
    """A spec's shape as messages write it: ``[batch, 3, 224, 224]``."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_inputs(inputs: Sequence[RequestInput], specs: Sequence[TensorSpec]) -> None:
    """Raise InferenceInputError unless ``inputs`` are exactly the model's inputs, each of the right
    datatype, rank and fixed dimensions (dynamic dimensions take any size)."""
    by_name = {spec.name: spec for spec in specs}
    given = {inp.name for inp in inputs}
    for inp in inputs:
        spec = by_name.get(inp.name)
        if spec is None:
            expected = ", ".join(f"'{s.name}'" for s in specs)
            raise InferenceInputError(f"unknown input '{inp.name}'; the model takes {expected}")
        _check_one(inp, spec)
    missing = [spec for spec in specs if spec.name not in given]
    if missing:
        spec = missing[0]
        raise InferenceInputError(
            f"missing input '{spec.name}' ({kserve_datatype(spec.dtype)} {describe_shape(spec.shape)})"
        )


def _check_one(inp: RequestInput, spec: TensorSpec) -> None:
    expected_type = kserve_datatype(spec.dtype)
    if inp.datatype != expected_type:
        raise InferenceInputError(f"input '{inp.name}': expected datatype {expected_type}, received {inp.datatype}")
    fits = len(inp.shape) == len(spec.shape) and all(
        not isinstance(want, int) or want == got for want, got in zip(spec.shape, inp.shape, strict=True)
    )
    if not fits:
        raise InferenceInputError(
            f"input '{inp.name}': expected shape {describe_shape(spec.shape)}, received {list(inp.shape)}"
        )


def check_outputs(requested: Sequence[RequestedOutput] | None, specs: Sequence[TensorSpec]) -> None:
    """Raise InferenceInputError when the request asks for an output the model does not have."""
    if requested is None:
        return
    names = {spec.name for spec in specs}
    for out in requested:
        if out.name not in names:
            expected = ", ".join(f"'{s.name}'" for s in specs)
            raise InferenceInputError(f"unknown output '{out.name}'; the model has {expected}")
