"""Inference request/response codecs: KServe v2 JSON and Triton's binary tensor data extension.

Knows nothing of HTTP or runtimes: it turns request bytes into an :class:`InferenceRequest` and arrays
into response bytes. The transport hands over the body and the value of the
``Inference-Header-Content-Length`` header; the answer says which value to send back in that header.

Binary tensor data extension (as tritonclient sends it): the body is a JSON header of
``header_length`` bytes followed by the raw bytes of every input that carries
``parameters.binary_data_size``, in the order of ``inputs``. Fixed-width types are little-endian
row-major; ``BYTES`` elements are each a 4-byte little-endian length then the bytes. The response uses
the same layout for every output asked for with ``parameters.binary_data`` (or, for outputs that do not
say, the request-level ``parameters.binary_data_output``).

Hand-written rather than taken from ``tritonclient.utils``: that package is a client (it pulls gevent
and geventhttpclient), the server must not depend on it, and the server needs bounds checks with
messages naming the tensor, which a client's helpers do not give.

Usage::

    request = parse_request(body, header_length)          # BadRequestError when malformed
    arrays = decode_inputs(request)                        # name -> ndarray
    response = encode_response("m", "1.0.0", request, model_outputs)
    send(response.body, header_length=response.header_length)
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepack.agent.api.datatypes import BYTES, datatype_of, numpy_dtype
from edgepack.errors import BadRequestError, RuntimeBackendError

__all__ = [
    "EncodedResponse",
    "InferenceRequest",
    "RequestInput",
    "RequestedOutput",
    "decode_inputs",
    "decode_tensor",
    "deserialize_bytes",
    "encode_response",
    "load_json",
    "parse_request",
    "serialize_bytes",
]

try:  # a faster JSON parser where installed (see load_json)
    import orjson as _orjson
except ImportError:  # pragma: no cover - the agent extra installs it
    _orjson = None

_LENGTH = struct.Struct("<I")
# the most dimensions a tensor may have: numpy 1 stops at 32 (numpy 2 at 64); no model signature comes near
MAX_RANK = 32
# which numpy kinds JSON data may hold for each datatype family (bool < int < float, never the reverse)
_JSON_KINDS = {"b": "b", "u": "bui", "i": "bui", "f": "buif"}


@dataclass(frozen=True)
class RequestInput:
    """One input as the request states it; exactly one of ``data`` (JSON) and ``raw`` (binary) is set."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any = None
    raw: memoryview | None = None


@dataclass(frozen=True)
class RequestedOutput:
    """An output the request asks for; ``binary`` None means: as the request-level default says."""

    name: str
    binary: bool | None = None


@dataclass(frozen=True)
class InferenceRequest:
    """A parsed inference request. ``outputs`` None: every output the model has."""

    inputs: list[RequestInput]
    outputs: list[RequestedOutput] | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def binary_output(self) -> bool:
        """The request-level default for outputs that do not say (``binary_data_output``)."""
        return bool(self.parameters.get("binary_data_output", False))


@dataclass(frozen=True)
class EncodedResponse:
    """Response bytes; ``header_length`` is set (JSON header size) when binary tensor data follows."""

    body: bytes
    header_length: int | None = None


# --- requests ------------------------------------------------------------------------------------


def parse_request(body: bytes, header_length: int | None = None) -> InferenceRequest:
    """Parse an inference request body; ``header_length`` is ``Inference-Header-Content-Length``."""
    view = memoryview(body)
    if header_length is None:
        header, tail = view, view[len(view) :]
    else:
        if not 0 <= header_length <= len(view):
            raise BadRequestError(
                f"Inference-Header-Content-Length is {header_length} but the body has {len(view)} bytes"
            )
        header, tail = view[:header_length], view[header_length:]
    doc = load_json(bytes(header))
    if not isinstance(doc, dict):
        raise BadRequestError("the request must be a JSON object with an 'inputs' list")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequestError("'id' must be a string")
    if request_id is not None and not _is_unicode(request_id):
        raise BadRequestError("'id' is not valid Unicode (a lone surrogate escape?); the response could not echo it")
    parameters = _parameters(doc.get("parameters"), "the request")
    if not isinstance(parameters.get("binary_data_output", False), bool):
        raise BadRequestError("parameters.binary_data_output must be true or false")
    inputs = _parse_inputs(doc.get("inputs"), tail)
    outputs = _parse_outputs(doc.get("outputs"))
    return InferenceRequest(inputs=inputs, outputs=outputs, id=request_id, parameters=parameters)


def load_json(text: bytes, what: str = "the request header") -> Any:
    """``text`` parsed as JSON; BadRequestError (naming ``what``) when it is not JSON.

    orjson parses first where it is installed (the ``agent`` extra has it): a ResNet-sized JSON request
    (150,528 floats, 3.1 MB) takes it 7.5 ms against the standard library's 47.5 ms. What orjson refuses
    (``NaN``/``Infinity`` literals, numbers past the float range, lone surrogate escapes, malformed JSON)
    goes to the standard library, which reads it as before or words the error. One difference remains:
    integers outside int64..uint64, which no tensor datatype holds, orjson reads as floats, so an integer
    tensor refuses them as floating-point values rather than as out of range.

    Responses are written by orjson too (a [1, 21, 224, 224] FP32 output: 36 ms against 563), the same
    values in the same shortest round-trip form (``1e-7`` where the standard library writes ``1e-07``),
    except when an output holds NaN or Infinity: orjson would write null, so the standard library writes
    those, as ``NaN``/``Infinity``, as before."""
    if _orjson is not None:
        try:
            return _orjson.loads(text)
        except _orjson.JSONDecodeError:
            pass  # the standard library decides, and words the error
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
        raise BadRequestError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequestError(f"{what} nests JSON too deeply") from None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequestError(f"'parameters' of {where} must be a JSON object")
    return value


def _parse_inputs(items: Any, tail: memoryview) -> list[RequestInput]:
    if not isinstance(items, list) or not items:
        raise BadRequestError("the request must have a non-empty 'inputs' list")
    inputs: list[RequestInput] = []
    seen: set[str] = set()
    offset = 0
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequestError(f"inputs[{index}] must be a JSON object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequestError(f"inputs[{index}] has no 'name'")
        if name in seen:
            raise BadRequestError(f"input '{name}' is given twice")
        seen.add(name)
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise BadRequestError(f"input '{name}' has no 'datatype'")
        shape = _shape(item.get("shape"), name)
        params = _parameters(item.get("parameters"), f"input '{name}'")
        if "shared_memory_region" in params:
            raise BadRequestError(f"input '{name}': shared memory is not supported by this server")
        size = params.get("binary_data_size")
        if size is None:
            if "data" not in item:
                raise BadRequestError(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
            inputs.append(RequestInput(name, datatype, shape, data=item["data"]))
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequestError(f"input '{name}': binary_data_size must be a non-negative integer")
        if "data" in item:
            raise BadRequestError(f"input '{name}' has both 'data' and parameters.binary_data_size")
        if offset + size > len(tail):
            raise BadRequestError(
                f"input '{name}': binary_data_size {size} runs past the end of the body "
                f"({len(tail) - offset} bytes left); the body is truncated"
            )
        inputs.append(RequestInput(name, datatype, shape, raw=tail[offset : offset + size]))
        offset += size
    if offset != len(tail):
        raise BadRequestError(
            f"the body has {len(tail) - offset} bytes after the binary data of the last input; "
            "check binary_data_size and Inference-Header-Content-Length"
        )
    return inputs


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise BadRequestError(f"input '{name}': 'shape' must be a list of non-negative integers, got {_brief(value)}")
    if len(value) > MAX_RANK:
        raise BadRequestError(
            f"input '{name}': 'shape' has {len(value)} dimensions; this server takes at most {MAX_RANK}"
        )
    return tuple(value)


def _brief(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a huge or deep value cannot blow up a message."""
    try:
        text = repr(value)
    except RecursionError:
        return "a value nested too deeply to show"
    return text if len(text) <= limit else text[:limit] + "…"


def _parse_outputs(items: Any) -> list[RequestedOutput] | None:
    if items is None:
        return None
    if not isinstance(items, list):
        raise BadRequestError("'outputs' must be a list")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequestError(f"outputs[{index}] must be a JSON object with a 'name'")
        name = item["name"]
        if name in seen:
            raise BadRequestError(f"output '{name}' is asked for twice")
        seen.add(name)
        params = _parameters(item.get("parameters"), f"output '{name}'")
        if params.get("classification"):
            raise BadRequestError(f"output '{name}': the classification extension is not supported")
        if "shared_memory_region" in params:
            raise BadRequestError(f"output '{name}': shared memory is not supported by this server")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise BadRequestError(f"output '{name}': parameters.binary_data must be true or false")
        outputs.append(RequestedOutput(name, binary))
    return outputs


def decode_inputs(request: InferenceRequest) -> dict[str, np.ndarray]:
    """Every input of ``request`` as an array of its stated datatype and shape."""
    return {inp.name: decode_tensor(inp) for inp in request.inputs}


def decode_tensor(inp: RequestInput) -> np.ndarray:
    """One input as an array; BadRequestError names it when its data does not fit its shape/datatype."""
    dtype = numpy_dtype(inp.datatype, tensor=inp.name)
    count = math.prod(inp.shape)
    if inp.raw is not None:
        if inp.datatype == BYTES:
            array = deserialize_bytes(inp.raw, tensor=inp.name)
        else:
            expected = count * dtype.itemsize
            if len(inp.raw) != expected:
                raise BadRequestError(
                    f"input '{inp.name}': {len(inp.raw)} bytes of binary data, but {inp.datatype} "
                    f"shape {list(inp.shape)} needs {expected}"
                )
            array = np.frombuffer(inp.raw, dtype=dtype)
            if not array.flags.aligned:
                array = array.copy()
    elif inp.datatype == BYTES:
        array = _bytes_from_json(inp.data, inp.name)
    else:
        array = _numbers_from_json(inp.data, inp.datatype, dtype, inp.name)
    if array.size != count:
        raise BadRequestError(
            f"input '{inp.name}': {array.size} elements in the data, but shape {list(inp.shape)} needs {count}"
        )
    try:
        return array.reshape(inp.shape)
    except ValueError:  # e.g. [0, 2**62]: no elements, but numpy cannot describe the array
        raise BadRequestError(f"input '{inp.name}': shape {list(inp.shape)} is too large to represent") from None


def _numbers_from_json(data: Any, datatype: str, dtype: np.dtype, name: str) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    try:
        array = np.array(data)
    except ValueError:
        raise BadRequestError(f"input '{name}': 'data' is a ragged nested list") from None
    except RecursionError:
        raise BadRequestError(f"input '{name}': 'data' nests lists too deeply") from None
    if array.size == 0:
        return array.astype(dtype)
    if array.dtype.kind in "fO" and dtype.kind in "ui":
        # numpy turns ints past int64 (UINT64 data) into floats or objects; take them as Python ints
        return _big_ints_from_json(data, datatype, dtype, name)
    if array.dtype.kind not in _JSON_KINDS[dtype.kind]:
        raise BadRequestError(
            f"input '{name}': 'data' holds {_kind_name(array.dtype.kind)} values, which do not fit {datatype}"
        )
    if dtype.kind in "ui" and array.dtype.kind in "ui":
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise BadRequestError(f"input '{name}': a value in 'data' is out of range for {datatype}")
    try:
        with np.errstate(over="raise"):  # 1e300 as FP16/FP32 would turn into inf without a word
            return array.astype(dtype, copy=False)
    except FloatingPointError:
        raise BadRequestError(f"input '{name}': a value in 'data' is out of range for {datatype}") from None


def _big_ints_from_json(data: list[Any], datatype: str, dtype: np.dtype, name: str) -> np.ndarray:
    values = list(_flatten(data))
    for value in values:
        if not isinstance(value, int):
            kind = "floating-point" if isinstance(value, float) else "non-numeric"
            raise BadRequestError(f"input '{name}': 'data' holds {kind} values, which do not fit {datatype}")
    info = np.iinfo(dtype)
    if min(values) < info.min or max(values) > info.max:
        raise BadRequestError(f"input '{name}': a value in 'data' is out of range for {datatype}")
    return np.array(values, dtype=dtype)


def _kind_name(kind: str) -> str:
    return {"b": "boolean", "u": "integer", "i": "integer", "f": "floating-point"}.get(kind, "non-numeric")


def _bytes_from_json(data: Any, name: str) -> np.ndarray:
    elements: list[bytes] = []
    for item in _flatten(data):
        if not isinstance(item, str):
            raise BadRequestError(f"input '{name}': BYTES 'data' must hold strings, got {type(item).__name__}")
        if not _is_unicode(item):  # a lone surrogate escape such as "\\ud800"
            raise BadRequestError(f"input '{name}': BYTES 'data' holds a string that is not valid Unicode")
        elements.append(item.encode("utf-8"))
    return _object_array(elements)


def _flatten(data: Any) -> Iterator[Any]:
    """The leaves of nested lists, in order; iterative, so nesting depth cannot exhaust the stack."""
    stack: list[Iterator[Any]] = [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def deserialize_bytes(raw: memoryview | bytes, *, tensor: str) -> np.ndarray:
    """A BYTES tensor's binary form (per element: 4-byte LE length, bytes) as a 1-D object array."""
    elements: list[bytes] = []
    pos, end = 0, len(raw)
    while pos < end:
        if pos + 4 > end:
            raise BadRequestError(f"input '{tensor}': BYTES data ends inside an element's length prefix")
        (length,) = _LENGTH.unpack_from(raw, pos)
        pos += 4
        if pos + length > end:
            raise BadRequestError(f"input '{tensor}': a BYTES element of {length} bytes runs past the end of its data")
        elements.append(bytes(raw[pos : pos + length]))
        pos += length
    return _object_array(elements)


def serialize_bytes(array: np.ndarray) -> bytes:
    """A BYTES tensor in binary form, elements in row-major order; str elements are UTF-8 encoded."""
    parts: list[bytes] = []
    for item in array.ravel(order="C"):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _object_array(elements: list[bytes]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array


# --- responses -----------------------------------------------------------------------------------


def encode_response(
    model_name: str,
    model_version: str,
    request: InferenceRequest,
    results: Mapping[str, np.ndarray],
) -> EncodedResponse:
    """The response body for ``results``: the outputs the request asked for, JSON or binary each."""
    if request.outputs is None:
        wanted = [(name, request.binary_output) for name in results]
    else:
        wanted = [(o.name, request.binary_output if o.binary is None else o.binary) for o in request.outputs]
    entries: list[dict[str, Any]] = []
    buffers: list[bytes] = []
    finite = True  # JSON data without NaN/Infinity, which orjson would write as null
    for name, binary in wanted:
        if name not in results:
            raise RuntimeBackendError(f"the model returned no output '{name}'")
        array = np.asarray(results[name])
        datatype = datatype_of(array, tensor=name)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = _binary(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            buffers.append(raw)
        else:
            entry["data"] = _json_data(array, datatype, name)
            finite = finite and (array.dtype.kind != "f" or bool(np.isfinite(array).all()))
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request.id is not None:
        doc["id"] = request.id
    header = _orjson.dumps(doc) if _orjson is not None and finite else json.dumps(doc, separators=(",", ":")).encode()
    if not buffers:
        return EncodedResponse(header)
    return EncodedResponse(b"".join([header, *buffers]), len(header))


def _binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == BYTES:
        return serialize_bytes(array)
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(order="C")


def _json_data(array: np.ndarray, datatype: str, name: str) -> list[Any]:
    if datatype != BYTES:
        return array.ravel(order="C").tolist()
    data: list[str] = []
    for item in array.ravel(order="C"):
        if isinstance(item, bytes):
            try:
                data.append(item.decode("utf-8"))
            except UnicodeDecodeError:
                raise BadRequestError(
                    f"output '{name}' holds bytes that are not UTF-8 text; ask for it with "
                    "parameters.binary_data = true"
                ) from None
        else:
            data.append(str(item))
    return data
