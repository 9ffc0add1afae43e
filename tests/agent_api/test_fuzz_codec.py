"""Fuzzing the API's codecs directly (no HTTP): request parsing and decoding, BYTES deserialization, JSON
loading, request decompression and response encoding.

Zero crashes means: each call returns, or raises an EdgepackError (BadRequestError, InferenceInputError,
RuntimeBackendError) with a message; anything else fails the test with the smallest input hypothesis
finds. Valid tensors also round-trip (JSON and binary) to the same values. Bounded and derandomized;
counts by kind are printed after the run.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgepack.agent.api.app import _decompress
from edgepack.agent.api.codec import (
    InferenceRequest,
    RequestedOutput,
    decode_inputs,
    deserialize_bytes,
    encode_response,
    load_json,
    parse_request,
    serialize_bytes,
)
from edgepack.agent.api.validation import check_inputs, check_outputs
from edgepack.errors import EdgepackError
from edgepack.manifest import TensorSpec
from tests.agent_api.fuzzing import COUNTS, INTERESTING, OUTCOMES, VALID
from tests.fuzz.common import deep_nesting, fuzz_settings, json_values, mutated_bytes, mutated_json

SPECS = [TensorSpec(name="x", dtype="float32", shape=["a", "b"])]


def _try(kind: str, fn: Any, *args: Any) -> Any:
    COUNTS[kind] += 1
    try:
        value = fn(*args)
    except EdgepackError as exc:
        assert str(exc), f"{kind}: {type(exc).__name__} without a message"
        OUTCOMES[f"{kind}: refused ({type(exc).__name__})"] += 1
        return None
    OUTCOMES[f"{kind}: accepted"] += 1
    return value


def _whole_request(body: bytes, header_length: int | None) -> Any:
    request = parse_request(body, header_length)
    arrays = decode_inputs(request)
    check_inputs(request.inputs, SPECS)
    check_outputs(request.outputs, [TensorSpec(name="y", dtype="float32", shape=["a", "b"])])
    return arrays


_json_bodies = st.one_of(
    st.sampled_from(sorted(VALID)).flatmap(lambda m: mutated_json(VALID[m], INTERESTING)).map(json.dumps),
    json_values.map(json.dumps),
).map(lambda text: text.encode("utf-8", "surrogatepass"))


@fuzz_settings(250)
@given(
    body=st.one_of(
        _json_bodies,
        st.sampled_from(sorted(VALID)).flatmap(lambda m: mutated_bytes(json.dumps(VALID[m]).encode())),
        st.binary(max_size=200),
        st.integers(1, 5000).map(
            lambda d: b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[1],"data":%s}]}' % deep_nesting(d)
        ),
    ),
)
def test_fuzz_parse_and_decode_json_requests(body: bytes) -> None:
    _try("codec: parse+decode a JSON request", _whole_request, body, None)


_ITEMSIZE = {"FP32": 4, "FP16": 2, "INT8": 1, "UINT64": 8, "BOOL": 1, "FP64": 8}


@fuzz_settings(200)
@given(
    datatype=st.sampled_from(["FP32", "FP16", "INT8", "UINT64", "BOOL", "BYTES", "FP64", "BF16", "X"]),
    shape=st.lists(st.integers(0, 6) | st.sampled_from([2**31, 2**62, 2**64]), max_size=4),
    size=st.none() | st.integers(-4, 300) | st.sampled_from([2**63, 1.5, "8", True]),
    tail=st.binary(max_size=300) | st.just(b"exact"),
    header_shift=st.none() | st.integers(-300, 300),
)
def test_fuzz_binary_requests(
    datatype: str, shape: list[int], size: Any, tail: bytes, header_shift: int | None
) -> None:
    count = math.prod(shape)
    if tail == b"exact":  # lengths that agree, so some requests get all the way through
        tail = bytes(count * _ITEMSIZE.get(datatype, 1)) if count <= 1024 else b""
        size, header_shift = len(tail), 0
    params = {} if size is None else {"binary_data_size": size}
    doc = {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "parameters": params}]}
    if size is None:
        doc["inputs"][0]["data"] = list(range(count)) if count <= 64 else [1]
    head = json.dumps(doc).encode()
    header_length = None if header_shift is None else len(head) + header_shift
    _try("codec: parse+decode a binary request", _whole_request, head + tail, header_length)


@fuzz_settings(150)
@given(
    raw=st.binary(max_size=200)
    | st.lists(st.binary(max_size=20), max_size=8).map(
        lambda items: b"".join(struct.pack("<I", len(i)) + i for i in items)
    )
)
def test_fuzz_deserialize_bytes(raw: bytes) -> None:
    COUNTS["codec: BYTES binary form"] += 1
    try:
        array = deserialize_bytes(raw, tensor="t")
    except EdgepackError:
        OUTCOMES["codec: BYTES binary form: refused"] += 1
        return
    OUTCOMES["codec: BYTES binary form: accepted"] += 1
    assert serialize_bytes(array) == raw  # what parses writes back the same bytes


@fuzz_settings(120)
@given(
    text=st.binary(max_size=200)
    | st.integers(1, 30000).map(lambda d: deep_nesting(d, "dict"))
    | st.sampled_from([b"NaN", b"[Infinity]", b'"\\ud800"', b"1e999", b"9" * 5000, b"\xef\xbb\xbf{}"])
)
def test_fuzz_load_json(text: bytes) -> None:
    _try("codec: load_json", load_json, text)


@fuzz_settings(100)
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=200).map(gzip.compress).flatmap(mutated_bytes),
        st.integers(1, 4096).map(lambda n: gzip.compress(b"0" * n)),
    ),
    encoding=st.sampled_from([b"gzip", b"deflate", b"br"]),
)
def test_fuzz_decompress(data: bytes, encoding: bytes) -> None:
    result = _try("codec: request decompression", _decompress, data, encoding, 1024)
    assert result is None or len(result) <= 1024


_arrays = st.one_of(
    hnp.arrays(
        st.sampled_from([np.float32, np.float16, np.float64, np.int8, np.uint64, np.int64, np.bool_, np.uint16]),
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
    ),
    st.lists(st.binary(max_size=8), min_size=0, max_size=5).map(lambda items: _objects(items)),
    st.lists(st.text(max_size=8), min_size=0, max_size=5).map(lambda items: _objects(items)),
    st.sampled_from([np.zeros(2, np.complex64), np.array(["a"], dtype="U1"), np.zeros((2, 0), np.float32)]),
)


def _objects(items: list[Any]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


@fuzz_settings(200)
@given(array=_arrays, binary=st.booleans(), request_default=st.booleans())
def test_fuzz_encode_response(array: np.ndarray, binary: bool, request_default: bool) -> None:
    request = InferenceRequest(
        inputs=[], outputs=[RequestedOutput("y", binary)], parameters={"binary_data_output": request_default}
    )
    encoded = _try("codec: encode a response", encode_response, "m", "1.0.0", request, {"y": array})
    if encoded is None:
        return
    header = encoded.body if encoded.header_length is None else encoded.body[: encoded.header_length]
    doc = json.loads(header)
    (out,) = doc["outputs"]
    assert out["shape"] == list(array.shape)
    if encoded.header_length is not None:
        assert out["parameters"]["binary_data_size"] == len(encoded.body) - encoded.header_length


@fuzz_settings(150)
@given(
    array=hnp.arrays(
        st.sampled_from([np.float32, np.float16, np.int8, np.int32, np.uint8, np.uint64, np.bool_]),
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
    ),
    binary=st.booleans(),
)
def test_tensors_round_trip(array: np.ndarray, binary: bool) -> None:
    """A response a client reads back as a request decodes to the same values (NaN included)."""
    COUNTS["codec: round trip"] += 1
    request = InferenceRequest(inputs=[], outputs=[RequestedOutput("y", binary)])
    encoded = encode_response("m", "1", request, {"y": array})
    length = encoded.header_length
    out = json.loads(encoded.body if length is None else encoded.body[:length])["outputs"][0]
    if binary:
        doc = {
            "inputs": [
                {"name": "y", "datatype": out["datatype"], "shape": out["shape"], "parameters": out["parameters"]}
            ]
        }
        head = json.dumps(doc).encode()
        back = decode_inputs(parse_request(head + encoded.body[length:], len(head)))["y"]
    else:
        doc = {"inputs": [{"name": "y", "datatype": out["datatype"], "shape": out["shape"], "data": out["data"]}]}
        back = decode_inputs(parse_request(json.dumps(doc).encode()))["y"]
    assert back.dtype == array.dtype.newbyteorder("<") and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    OUTCOMES["codec: round trip: equal"] += 1
