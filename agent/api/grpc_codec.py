"""KServe v2 gRPC tensors: a ``ModelInferRequest`` into the dataplane's :class:`InferenceRequest`, and
model outputs into a ``ModelInferResponse``.

No gRPC and no runtimes here, like :mod:`~edgepack.agent.api.codec` for HTTP. Inputs come either all
in ``raw_input_contents`` (what ``tritonclient.grpc`` sends: one little-endian row-major buffer per
input, BYTES elements each a 4-byte length then the bytes — the same layout as the binary tensor data
extension) or each in its typed ``contents`` field. Both become the :class:`RequestInput` ``raw`` form,
so :func:`~edgepack.agent.api.codec.decode_tensor` checks and decodes them exactly as it does HTTP's
binary data, with the same messages. Outputs always go back in ``raw_output_contents``, in the order of
the response's ``outputs`` (tritonclient reads them from there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgepack.agent.api.codec import MAX_RANK, InferenceRequest, RequestedOutput, RequestInput, serialize_bytes
from edgepack.agent.api.datatypes import BYTES, datatype_of, numpy_dtype
from edgepack.agent.api.grpc_proto import messages
from edgepack.errors import BadRequestError, RuntimeBackendError

__all__ = ["encode_infer_response", "parse_infer_request"]

# the InferTensorContents field each datatype's values travel in when not raw (FP16 has none: raw only)
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", BYTES: "bytes_contents",
}  # fmt: skip
_SOURCE = {"bool_contents": np.bool_, "int_contents": np.int32, "int64_contents": np.int64, "uint_contents": np.uint32,
           "uint64_contents": np.uint64, "fp32_contents": np.float32, "fp64_contents": np.float64}  # fmt: skip


def parse_infer_request(request: Any) -> InferenceRequest:
    """A parsed ``ModelInferRequest`` as the dataplane takes it; BadRequestError when malformed."""
    raw = request.raw_input_contents
    if not request.inputs:
        raise BadRequestError("the request has no inputs")
    if raw and len(raw) != len(request.inputs):
        raise BadRequestError(
            f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; "
            "give every input's data in raw_input_contents, or none"
        )
    inputs: list[RequestInput] = []
    seen: set[str] = set()
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise BadRequestError(f"inputs[{index}] has no name")
        if name in seen:
            raise BadRequestError(f"input '{name}' is given twice")
        seen.add(name)
        if "shared_memory_region" in tensor.parameters:
            raise BadRequestError(f"input '{name}': shared memory is not supported by this server")
        shape = _shape(tensor.shape, name)
        data = raw[index] if raw else _contents_bytes(tensor, name)
        inputs.append(RequestInput(name, tensor.datatype, shape, raw=memoryview(data)))
    outputs: list[RequestedOutput] | None = None
    if request.outputs:
        outputs = []
        for out in request.outputs:
            if "classification" in out.parameters:
                raise BadRequestError(f"output '{out.name}': the classification extension is not supported")
            if "shared_memory_region" in out.parameters:
                raise BadRequestError(f"output '{out.name}': shared memory is not supported by this server")
            if any(o.name == out.name for o in outputs):
                raise BadRequestError(f"output '{out.name}' is asked for twice")
            outputs.append(RequestedOutput(out.name, binary=True))
    return InferenceRequest(
        inputs=inputs, outputs=outputs, id=request.id or None, parameters=_parameters(request.parameters)
    )


def _shape(dims: Any, name: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise BadRequestError(f"input '{name}': 'shape' must be non-negative integers, got {list(shape)}")
    if len(shape) > MAX_RANK:
        raise BadRequestError(
            f"input '{name}': 'shape' has {len(shape)} dimensions; this server takes at most {MAX_RANK}"
        )
    return shape


def _contents_bytes(tensor: Any, name: str) -> bytes:
    """An input's typed ``contents`` in the raw layout, so one decoder checks both forms."""
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        numpy_dtype(tensor.datatype, tensor=name)  # an unknown datatype: its own message
        raise BadRequestError(f"input '{name}': {tensor.datatype} data must come in raw_input_contents")
    if not tensor.HasField("contents"):
        raise BadRequestError(f"input '{name}' has no data: neither raw_input_contents nor contents")
    values = getattr(tensor.contents, field)
    count = math.prod(int(d) for d in tensor.shape)
    if len(values) != count:
        raise BadRequestError(
            f"input '{name}': contents.{field} has {len(values)} values, but shape {list(tensor.shape)} needs {count}"
        )
    if tensor.datatype == BYTES:
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return serialize_bytes(array)
    dtype = numpy_dtype(tensor.datatype, tensor=name)
    array = np.asarray(values, dtype=_SOURCE[field])
    if dtype.kind in "iu" and array.size and dtype.itemsize < array.dtype.itemsize:  # INT8 in int_contents
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise BadRequestError(f"input '{name}': a value in contents is out of range for {tensor.datatype}")
    return array.astype(dtype.newbyteorder("<")).tobytes()


def _parameters(params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, choice) if choice else None
    return out


def encode_infer_response(
    model_name: str, model_version: str, request: InferenceRequest, results: Mapping[str, np.ndarray]
) -> bytes:
    """The serialized ``ModelInferResponse``: the outputs asked for (all when none were), raw each."""
    names = list(results) if request.outputs is None else [o.name for o in request.outputs]
    response = messages.ModelInferResponse(model_name=model_name, model_version=model_version, id=request.id or "")
    for name in names:
        if name not in results:
            raise RuntimeBackendError(f"the model returned no output '{name}'")
        array = np.asarray(results[name])
        datatype = datatype_of(array, tensor=name)
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if datatype == BYTES:
            response.raw_output_contents.append(serialize_bytes(array))
        else:
            response.raw_output_contents.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return response.SerializeToString()
