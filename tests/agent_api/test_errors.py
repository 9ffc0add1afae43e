"""Every malformed or refused request answers 4xx with a message naming the problem; the server lives on."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from edgepack.agent.api import ServerHandle
from tests.agent_api.conftest import MAX_BODY
from tests.agent_api.helpers import assert_serves, binary_request, error_of, raw, x_input

Client = httpclient.InferenceServerClient
INFER = "/v2/models/linear/infer"


def _refused(client: Client, *args: object, **kwargs: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        client.infer(*args, **kwargs)  # type: ignore[arg-type]
    return info.value


def test_unknown_model_and_version(client: Client) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    err = _refused(client, "nope", [x_input(x)])
    assert err.status() == "404" and "nope" in err.message()
    err = _refused(client, "linear", [x_input(x)], model_version="9.9.9")
    assert err.status() == "404" and "9.9.9" in err.message() and "1.0.0" in err.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "404"


def test_model_not_ready(client: Client) -> None:
    err = _refused(client, "warming", [x_input(np.ones((1, 4), dtype=np.float32))])
    assert err.status() == "503" and "warming" in err.message()


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [((2, 5), "expected shape [batch, 4], received [2, 5]"), ((4,), "expected shape [batch, 4], received [4]")],
)
def test_wrong_shape(client: Client, shape: tuple[int, ...], fragment: str) -> None:
    err = _refused(client, "linear", [x_input(np.ones(shape, dtype=np.float32))])
    assert err.status() == "400"
    assert "'x'" in err.message() and fragment in err.message()


def test_wrong_datatype(client: Client) -> None:
    inp = httpclient.InferInput("x", [1, 4], "FP64").set_data_from_numpy(np.ones((1, 4)))
    err = _refused(client, "linear", [inp])
    assert err.status() == "400"
    assert "'x'" in err.message() and "FP32" in err.message() and "FP64" in err.message()


def test_missing_and_unknown_input(client: Client) -> None:
    a = httpclient.InferInput("a", [1, 8], "FP16").set_data_from_numpy(np.ones((1, 8), np.float16))
    err = _refused(client, "half", [a])
    assert err.status() == "400" and "missing input 'b'" in err.message()
    c = httpclient.InferInput("c", [1, 8], "FP16").set_data_from_numpy(np.ones((1, 8), np.float16))
    err = _refused(client, "half", [a, c])
    assert err.status() == "400" and "unknown input 'c'" in err.message()


def test_unknown_output(client: Client) -> None:
    out = [httpclient.InferRequestedOutput("z")]
    err = _refused(client, "linear", [x_input(np.ones((1, 4), np.float32))], outputs=out)
    assert err.status() == "400" and "unknown output 'z'" in err.message()


def test_element_count_does_not_match_shape(server: ServerHandle) -> None:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [1, 2, 3, 4, 5]}]})
    status, _, data = raw(server, "POST", INFER, body.encode())
    assert status == 400
    assert "'x'" in error_of(data) and "5 elements" in error_of(data) and "needs 8" in error_of(data)


def test_binary_size_does_not_match_shape(server: ServerHandle) -> None:
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 12}}]}
    body, headers = binary_request(header, b"\0" * 12)
    status, _, data = raw(server, "POST", INFER, body, headers)
    assert status == 400 and "12 bytes" in error_of(data) and "needs 32" in error_of(data)


def test_truncated_binary_body(server: ServerHandle) -> None:
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}}]}
    body, headers = binary_request(header, b"\0" * 20)
    status, _, data = raw(server, "POST", INFER, body, headers)
    assert status == 400
    assert "'x'" in error_of(data) and "truncated" in error_of(data)


@pytest.mark.parametrize(
    ("body", "headers", "fragment"),
    [
        (b"{not json", {}, "not valid JSON"),
        (b"\xff\xfe\x00", {}, "not valid JSON"),
        (b"[" * 200_000, {}, "JSON"),
        (b"[1, 2]", {}, "JSON object"),
        (b"{}", {}, "'inputs'"),
        (b'{"inputs": [{"name": "x"}]}', {}, "'datatype'"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}', {}, "'shape'"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4]}]}', {}, "neither"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ["a","b","c","d"]}]}', {}, "FP32"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [[1], [2, 3]]}]}', {}, "ragged"),
        (b"{}", {"Inference-Header-Content-Length": "abc"}, "not a number"),
        (b"{}", {"Inference-Header-Content-Length": "99"}, "99"),
        (b"{}", {"Content-Encoding": "br"}, "br"),
        (b"not gzip", {"Content-Encoding": "gzip"}, "decompressed"),
    ],
)
def test_malformed_requests(server: ServerHandle, body: bytes, headers: dict[str, str], fragment: str) -> None:
    status, _, data = raw(server, "POST", INFER, body, headers)
    assert status == 400, data
    assert fragment in error_of(data)


def test_backend_input_error_is_a_bad_request(client: Client) -> None:
    err = _refused(client, "guarded", [x_input(np.ones((1, 4), np.float32))])
    assert err.status() == "400" and "values must lie in [0, 1]" in err.message()


def test_model_failure_is_a_500_with_the_cause(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    err = _refused(client, "boom", [x_input(np.ones((1, 4), np.float32))])
    assert err.status() == "500" and "the accelerator fell over" in err.message()
    assert any("failed" in r.message for r in caplog.records)


def test_json_output_of_non_utf8_bytes_is_refused(client: Client) -> None:
    inp = httpclient.InferInput("text", [1], "BYTES").set_data_from_numpy(np.array([b"\xff"], dtype=object))
    out = [httpclient.InferRequestedOutput("upper", binary_data=False)]
    err = _refused(client, "bytes_echo", [inp], outputs=out)
    assert err.status() == "400" and "'upper'" in err.message() and "binary_data" in err.message()


def test_oversized_body(server: ServerHandle) -> None:
    big = b"{" + b" " * (MAX_BODY + 10) + b"}"
    status, _, data = raw(server, "POST", INFER, big)
    assert status == 413 and str(MAX_BODY) in error_of(data)
    status, _, data = raw(server, "POST", INFER, iter([big[:1000], big[1000:]]), chunked=True)  # no Content-Length
    assert status == 413


def test_oversized_after_decompression(server: ServerHandle) -> None:
    bomb = gzip.compress(b" " * (MAX_BODY * 4))
    status, _, data = raw(server, "POST", INFER, bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "decompressed" in error_of(data)


def test_gzip_request_is_accepted(client: Client) -> None:
    x = np.ones((2, 4), np.float32)
    result = client.infer("linear", [x_input(x)], request_compression_algorithm="gzip")
    assert result.as_numpy("y").shape == (2, 3)


def test_routing_errors(server: ServerHandle) -> None:
    status, headers, data = raw(server, "GET", INFER)
    assert status == 405 and headers["allow"] == "POST" and "GET" in error_of(data)
    for path in ("/v3", "/v2/models/linear/explain", "/v2/models/linear/versions", "/v2/models/a/b/c/d"):
        status, _, data = raw(server, "GET", path)
        assert status == 404, path
        assert "no such endpoint" in error_of(data)


def test_random_garbage_never_gets_a_5xx(server: ServerHandle) -> None:
    rng = random.Random(3)
    valid, _ = binary_request(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}]},
        b"\0" * 16,
    )
    for _ in range(150):
        body = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        headers = {"Inference-Header-Content-Length": str(rng.randint(0, len(body) + 3))}
        status, _, data = raw(server, "POST", INFER, bytes(body), headers)
        assert status in (200, 400, 404), (status, data)


def test_still_serves_after_all_of_the_above(client: Client) -> None:
    assert client.is_server_live()
    assert_serves(client)
