"""tritonclient against a real server: metadata, health, and inference in JSON and binary form."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tritonclient.http as httpclient

from edgepack.agent.api import ServerHandle
from edgepack.agent.api.static_repository import StaticRepository
from tests.agent_api.fakes import linear
from tests.agent_api.helpers import raw, x_input

Client = httpclient.InferenceServerClient


def test_health_and_server_metadata(client: Client) -> None:
    assert client.is_server_live()
    meta = client.get_server_metadata()
    assert meta["name"] == "edgepack"
    assert "binary_tensor_data" in meta["extensions"]
    assert meta["version"]


def test_server_ready_follows_the_repository(client: Client, repository: StaticRepository) -> None:
    assert not client.is_server_ready()  # 'warming' is not ready
    repository.set_ready("warming", True)
    try:
        assert client.is_server_ready()
    finally:
        repository.set_ready("warming", False)


def test_model_metadata(client: Client) -> None:
    meta = client.get_model_metadata("linear")
    assert meta["name"] == "linear"
    assert meta["versions"] == ["0.9.0", "1.0.0"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ]
    assert client.get_model_metadata("linear", model_version="0.9.0")["platform"] == "numpy"
    assert client.get_model_metadata("bytes_echo")["inputs"][0]["datatype"] == "BYTES"
    assert client.get_model_metadata("half")["inputs"][0] == {"name": "a", "datatype": "FP16", "shape": [-1, 8]}


def test_model_ready_and_index(client: Client) -> None:
    assert client.is_model_ready("linear")
    assert client.is_model_ready("linear", model_version="0.9.0")
    assert not client.is_model_ready("warming")
    assert not client.is_model_ready("nope")
    index = client.get_model_repository_index()
    assert {"name": "linear", "version": "1.0.0", "state": "READY", "reason": ""} in index
    assert any(e["name"] == "warming" and e["state"] == "UNAVAILABLE" for e in index)


@pytest.mark.parametrize("input_binary", [True, False], ids=["in-binary", "in-json"])
@pytest.mark.parametrize("output_binary", [True, False], ids=["out-binary", "out-json"])
def test_infer_matches_numpy(client: Client, input_binary: bool, output_binary: bool) -> None:
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=output_binary) for n in ("y", "label")]
    result = client.infer("linear", [x_input(x, binary=input_binary)], outputs=outputs)
    expected = linear(x)
    np.testing.assert_allclose(result.as_numpy("y"), expected["y"], rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    assert ("parameters" in result.get_output("y")) is output_binary
    assert result.get_response()["model_version"] == "1.0.0"


def test_default_is_binary_output_and_any_batch(client: Client) -> None:
    for batch in (1, 7):
        x = np.ones((batch, 4), dtype=np.float32)
        result = client.infer("linear", [x_input(x)])  # no outputs: tritonclient asks binary_data_output
        assert result.get_output("y")["parameters"]["binary_data_size"] == batch * 3 * 4
        np.testing.assert_allclose(result.as_numpy("y"), linear(x)["y"], rtol=1e-6)


def test_outputs_selection_id_and_version(client: Client) -> None:
    x = np.ones((2, 4), dtype=np.float32)
    result = client.infer(
        "linear",
        [x_input(x)],
        outputs=[httpclient.InferRequestedOutput("label", binary_data=False)],
        request_id="req-42",
        model_version="0.9.0",
    )
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["label"]
    assert response["id"] == "req-42"
    assert response["model_version"] == "0.9.0"
    assert result.as_numpy("y") is None


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp16(client: Client, binary: bool) -> None:
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 8)).astype(np.float16)
    b = rng.standard_normal((3, 8)).astype(np.float16)
    inputs = []
    for name, value in (("a", a), ("b", b)):
        inp = httpclient.InferInput(name, list(value.shape), "FP16")
        inputs.append(inp.set_data_from_numpy(value, binary_data=binary))
    out = [httpclient.InferRequestedOutput("sum", binary_data=binary)]
    result = client.infer("half", inputs, outputs=out)
    got = result.as_numpy("sum")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, a + b)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes(client: Client, binary: bool) -> None:
    text = np.array([b"hello", b"", "w\u00f6rld".encode(), b"a b c"], dtype=object)
    inp = httpclient.InferInput("text", [4], "BYTES").set_data_from_numpy(text, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("upper", "length")]
    result = client.infer("bytes_echo", [inp], outputs=outputs)
    upper = [v if isinstance(v, bytes) else v.encode() for v in result.as_numpy("upper").tolist()]
    assert upper == [t.upper() for t in text]  # tritonclient gives str for JSON BYTES, bytes for binary
    assert result.as_numpy("length").tolist() == [5, 0, 6, 5]


def test_concurrent_async_requests(server: ServerHandle) -> None:
    client = httpclient.InferenceServerClient(server.url, concurrency=8)
    try:
        xs = [np.full((2, 4), i, dtype=np.float32) for i in range(32)]
        pending = [client.async_infer("linear", [x_input(x)]) for x in xs]
        for x, request in zip(xs, pending, strict=True):
            np.testing.assert_allclose(request.get_result().as_numpy("y"), linear(x)["y"], rtol=1e-6)
    finally:
        client.close()


def test_inference_runs_off_the_event_loop(server: ServerHandle) -> None:
    body = b'{"inputs":[{"name":"seconds","datatype":"FP32","shape":[1],"data":[0.6]}]}'
    slow = threading.Thread(target=raw, args=(server, "POST", "/v2/models/slow/infer", body))
    slow.start()
    time.sleep(0.1)
    started = time.perf_counter()
    status, _, _ = raw(server, "GET", "/v2/health/live")
    elapsed = time.perf_counter() - started
    slow.join()
    assert status == 200
    assert elapsed < 0.3, f"health answered in {elapsed:.2f}s while a slow inference ran"
