"""The codecs alone: every datatype both ways, checked against tritonclient's own encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.http import InferResult
from tritonclient.http._utils import _get_inference_request
from tritonclient.utils import serialize_byte_tensor

from edgepack.agent.api.codec import (
    decode_inputs,
    deserialize_bytes,
    encode_response,
    parse_request,
    serialize_bytes,
)
from edgepack.agent.api.validation import check_inputs
from edgepack.errors import BadRequestError, InferenceInputError
from edgepack.manifest import TensorSpec

NUMERIC = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], np.uint8),
    "UINT16": np.array([[0, 7, 65535]], np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 7, 2**63]], np.uint64),
    "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-(2**15), 0, 2**15 - 1]], np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], np.int64),
    "FP16": np.array([[-1.5, 0.0, 65504]], np.float16),
    "FP32": np.array([[-1.5, 1e-30, 3.4e38]], np.float32),
    "FP64": np.array([[-1.5, 1e-300, 1.7e308]], np.float64),
    "BYTES": np.array([[b"", b"\x00\xff", "\u00e9t\u00e9".encode()]], dtype=object),
}


def _tritonclient_body(name: str, datatype: str, value: np.ndarray, binary: bool) -> tuple[bytes, int | None]:
    inp = httpclient.InferInput(name, list(value.shape), datatype).set_data_from_numpy(value, binary_data=binary)
    body, header_length = _get_inference_request([inp], "", None, 0, False, False, 0, None, None)
    return (body if isinstance(body, bytes) else body.encode()), header_length


@pytest.mark.parametrize("datatype", list(NUMERIC))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_request_decodes_what_tritonclient_encodes(datatype: str, binary: bool) -> None:
    value = NUMERIC[datatype]
    if datatype == "BYTES" and not binary:
        value = np.array([[b"", b"abc", "\u00e9t\u00e9".encode()]], dtype=object)  # JSON carries UTF-8 only
    body, header_length = _tritonclient_body("t", datatype, value, binary)
    decoded = decode_inputs(parse_request(body, header_length))["t"]
    assert decoded.shape == value.shape
    if datatype == "BYTES":
        assert decoded.tolist() == value.tolist()
    else:
        assert decoded.dtype == value.dtype
        np.testing.assert_array_equal(decoded, value)


@pytest.mark.parametrize("datatype", list(NUMERIC))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_response_is_what_tritonclient_reads(datatype: str, binary: bool) -> None:
    value = NUMERIC[datatype]
    if datatype == "BYTES" and not binary:
        value = np.array([[b"", b"abc", "\u00e9t\u00e9".encode()]], dtype=object)
    request = parse_request(
        json.dumps({"inputs": [{"name": "i", "datatype": "BOOL", "shape": [1], "data": [1]}]}).encode()
    )
    request = type(request)(request.inputs, parameters={"binary_data_output": binary})
    response = encode_response("m", "1.0.0", request, {"t": value})
    assert (response.header_length is not None) is binary
    result = InferResult.from_response_body(response.body, header_length=response.header_length)
    got = result.as_numpy("t")
    assert result.get_output("t")["datatype"] == datatype
    if datatype == "BYTES":
        assert [v if isinstance(v, bytes) else v.encode() for v in got.ravel()] == value.ravel().tolist()
    else:
        np.testing.assert_array_equal(got, value)


def test_bytes_serialization_matches_tritonclient() -> None:
    value = np.array([b"a", b"", b"\x00" * 300, b"x"], dtype=object)
    assert serialize_bytes(value) == serialize_byte_tensor(value).item()
    assert deserialize_bytes(serialize_bytes(value), tensor="t").tolist() == value.tolist()
    with pytest.raises(BadRequestError, match="'t'"):
        deserialize_bytes(serialize_bytes(value)[:-1], tensor="t")
    with pytest.raises(BadRequestError, match="length prefix"):
        deserialize_bytes(b"\x01\x00", tensor="t")


def test_nested_json_data_and_range_checks() -> None:
    doc = {"inputs": [{"name": "x", "datatype": "INT8", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]}
    assert decode_inputs(parse_request(json.dumps(doc).encode()))["x"].tolist() == [[1, 2], [3, 4]]
    doc["inputs"][0]["data"] = [1, 2, 3, 300]
    with pytest.raises(BadRequestError, match="out of range for INT8"):
        decode_inputs(parse_request(json.dumps(doc).encode()))
    doc["inputs"][0]["data"] = [1, 2, 3, 4.5]
    with pytest.raises(BadRequestError, match="floating-point values, which do not fit INT8"):
        decode_inputs(parse_request(json.dumps(doc).encode()))


def test_trailing_bytes_after_binary_data_are_refused() -> None:
    head = json.dumps(
        {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [2], "parameters": {"binary_data_size": 2}}]}
    ).encode()
    with pytest.raises(BadRequestError, match="3 bytes after"):
        parse_request(head + b"abcde", len(head))


def test_validation_fixed_and_dynamic_dims() -> None:
    specs = [TensorSpec(name="x", dtype="float32", shape=["batch", 3, 2])]

    def request(shape: list[int], datatype: str = "FP32") -> bytes:
        return json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": []}]}).encode()

    check_inputs(parse_request(request([0, 3, 2])).inputs, specs)
    check_inputs(parse_request(request([9, 3, 2])).inputs, specs)
    with pytest.raises(InferenceInputError, match=r"expected shape \[batch, 3, 2\], received \[9, 2, 3\]"):
        check_inputs(parse_request(request([9, 2, 3])).inputs, specs)
    with pytest.raises(InferenceInputError, match="expected datatype FP32, received FP16"):
        check_inputs(parse_request(request([1, 3, 2], "FP16")).inputs, specs)


def test_the_fast_json_parser_accepts_and_refuses_what_the_standard_library_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgepack.agent.api import codec

    assert codec._orjson is not None, "orjson comes with the agent extra"
    calls = []
    real = codec._orjson.loads
    monkeypatch.setattr(codec._orjson, "loads", lambda text: calls.append(len(text)) or real(text))
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [0.1, 2.5, -3.0]}]})
    assert decode_inputs(parse_request(body.encode()))["x"].tolist() == pytest.approx([0.1, 2.5, -3.0])
    assert calls, "the fast path parsed the request"
    # what orjson refuses but the standard library reads goes on being read
    nan = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [NaN, Infinity]}]}'
    values = decode_inputs(parse_request(nan))["x"]
    assert np.isnan(values[0]) and np.isinf(values[1])
    top = b'{"inputs": [{"name": "x", "datatype": "UINT64", "shape": [1], "data": [18446744073709551615]}]}'
    assert decode_inputs(parse_request(top))["x"].tolist() == [2**64 - 1]
    big = top.replace(b"551615", b"551616")  # past every integer datatype: refused, as a float by orjson
    with pytest.raises(BadRequestError, match="do not fit UINT64"):
        decode_inputs(parse_request(big))
    # and errors are worded by the standard library either way
    with pytest.raises(BadRequestError, match=r"the request header is not valid JSON: Expecting"):
        parse_request(b'{"inputs": [}')
    with pytest.raises(BadRequestError, match="nests JSON too deeply"):
        parse_request(b"[" * 100_000)


def test_json_responses_carry_the_same_values_and_keep_nan_as_before() -> None:
    request = parse_request(
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0]}]}).encode()
    )
    values = np.array([[1e-7, 123456789.0, 0.1, -0.0, 2.5, 3.4e38]], dtype=np.float32)
    body = encode_response("m", "1", request, {"y": values}).body
    out = json.loads(body)["outputs"][0]
    assert out["shape"] == [1, 6] and out["datatype"] == "FP32"
    assert np.array_equal(np.array(out["data"], dtype=np.float32), values.ravel())
    with_nan = encode_response("m", "1", request, {"y": np.array([np.nan, np.inf, 1.0], np.float32)}).body
    assert b"NaN,Infinity,1.0" in with_nan  # as the standard library writes them, never null
