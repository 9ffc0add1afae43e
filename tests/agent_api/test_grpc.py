"""The KServe v2 gRPC transport, called with ``tritonclient.grpc`` unchanged.

tritonclient's own generated ``inference`` stubs are imported in this process next to the server's
messages (the duplicate-symbol trap ``grpc_proto.py`` avoids), and its stubs talk to the server directly
for what tritonclient's client does not send (typed ``contents``). Errors are checked by status code and
message; the load bound is shared with HTTP (a gate model holds requests in flight, no sleeps).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from edgepack.agent.api import ApiMetrics, ServerHandle, start_in_thread
from edgepack.agent.api.grpc_proto import _MESSAGES, messages
from edgepack.agent.api.static_repository import StaticRepository
from edgepack.agent.config import load_config
from tests.agent_api.conftest import MAX_BODY, TOKEN
from tests.agent_api.fakes import B, W, make_models
from tests.agent_api.test_overload import Gate, _gate_model, _wait_until


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def grpc_server(gate: Gate) -> Iterator[ServerHandle]:
    repository = StaticRepository([*make_models(), _gate_model(gate)])
    repository.set_ready("warming", False)
    handle = start_in_thread(
        repository, port=0, grpc_port=0, max_body_bytes=MAX_BODY, workers=2, max_concurrent_requests=2
    )
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def gclient(grpc_server: ServerHandle) -> Iterator[grpcclient.InferenceServerClient]:
    assert grpc_server.grpc is not None
    client = grpcclient.InferenceServerClient(grpc_server.grpc.url)
    yield client
    client.close()


def _x_input(x: np.ndarray, name: str = "x", datatype: str = "FP32") -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def _status(exc: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(exc.value.status())


def _metric(server: ServerHandle, name: str, **labels: str) -> float:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _assert_serves(client: grpcclient.InferenceServerClient) -> None:
    x = np.ones((1, 4), np.float32)
    result = client.infer("linear", [_x_input(x)])
    np.testing.assert_allclose(result.as_numpy("y"), x @ W + B, rtol=1e-6)


def test_messages_match_tritonclients_descriptors_field_by_field() -> None:
    def signature(d) -> tuple:
        fields = sorted(
            (f.number, f.name, f.type, f.is_repeated, f.message_type.full_name if f.message_type else None,
             f.containing_oneof.name if f.containing_oneof else None)
            for f in d.fields
        )  # fmt: skip
        return d.full_name, d.GetOptions().map_entry, fields, sorted(signature(n) for n in d.nested_types)

    for name in ("InferParameter", *_MESSAGES):
        ours = getattr(messages, name).DESCRIPTOR
        assert signature(ours) == signature(service_pb2.DESCRIPTOR.message_types_by_name[name]), name
        assert ours.file.pool is not service_pb2.DESCRIPTOR.pool  # never the default pool


def test_live_ready_and_metadata(gclient: grpcclient.InferenceServerClient) -> None:
    assert gclient.is_server_live()
    assert not gclient.is_server_ready()  # "warming" is not ready, so the server is not
    meta = gclient.get_server_metadata(as_json=True)
    assert meta["name"] == "edgepack" and "binary_tensor_data" in meta["extensions"]
    model = gclient.get_model_metadata("linear", as_json=True)
    assert model["platform"] == "onnxruntime_onnx"
    assert model["versions"] == ["0.9.0", "1.0.0"]
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert {o["name"] for o in model["outputs"]} == {"y", "label"}
    assert gclient.is_model_ready("linear")
    assert gclient.is_model_ready("linear", "1.0.0")
    assert not gclient.is_model_ready("warming")


def test_infer_fp32_and_requested_outputs(gclient: grpcclient.InferenceServerClient) -> None:
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    result = gclient.infer("linear", [_x_input(x)], request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("y"), x @ W + B, rtol=1e-5)
    np.testing.assert_array_equal(result.as_numpy("label"), np.argmax(x @ W + B, axis=1))
    response = result.get_response()
    assert response.model_name == "linear" and response.model_version == "1.0.0" and response.id == "r-1"
    only = gclient.infer("linear", [_x_input(x)], outputs=[grpcclient.InferRequestedOutput("label")])
    assert only.as_numpy("y") is None and only.as_numpy("label").shape == (5,)


def test_infer_bytes_and_fp16(gclient: grpcclient.InferenceServerClient) -> None:
    text = np.array([b"abc", "héllo".encode(), b""], dtype=object)
    result = gclient.infer("bytes_echo", [_x_input(text, "text", "BYTES")])
    assert list(result.as_numpy("upper")) == [b"ABC", "HéLLO".encode(), b""]
    np.testing.assert_array_equal(result.as_numpy("length"), [3, 6, 0])
    a = np.arange(16, dtype=np.float16).reshape(2, 8)
    half = gclient.infer("half", [_x_input(a, "a", "FP16"), _x_input(a, "b", "FP16")])
    np.testing.assert_array_equal(half.as_numpy("sum"), a + a)


def test_typed_contents_through_tritonclients_own_stubs(grpc_server: ServerHandle) -> None:
    assert grpc_server.grpc is not None
    with grpc.insecure_channel(grpc_server.grpc.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="linear")
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
        response = stub.ModelInfer(request)
        y = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(1, 3)
        np.testing.assert_allclose(y, np.array([[1, 2, 3, 4]], np.float32) @ W + B, rtol=1e-5)
        request.inputs[0].contents.fp32_contents.pop()
        with pytest.raises(grpc.RpcError) as short:
            stub.ModelInfer(request)
        assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'x': contents.fp32_contents has 3 values, but shape [1, 4] needs 4" in short.value.details()
        request.inputs[0].ClearField("contents")
        with pytest.raises(grpc.RpcError) as none:
            stub.ModelInfer(request)
        assert none.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'x' has no data" in none.value.details()


def test_bad_shape_unknown_model_and_not_ready(gclient: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as bad:
        gclient.infer("linear", [_x_input(np.ones((1, 5), np.float32))])
    assert _status(bad) == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x': expected shape [batch, 4], received [1, 5]" in bad.value.message()
    with pytest.raises(InferenceServerException) as wrong_type:
        gclient.infer("linear", [_x_input(np.ones((1, 4), np.float64), datatype="FP64")])
    assert _status(wrong_type) == "StatusCode.INVALID_ARGUMENT" and "expected datatype FP32" in wrong_type.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        gclient.infer("nope", [_x_input(np.ones((1, 4), np.float32))])
    assert _status(unknown) == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in unknown.value.message()
    with pytest.raises(InferenceServerException) as version:
        gclient.infer("linear", [_x_input(np.ones((1, 4), np.float32))], model_version="7.0.0")
    assert _status(version) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as meta:
        gclient.get_model_metadata("nope")
    assert _status(meta) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as warming:
        gclient.infer("warming", [_x_input(np.ones((1, 4), np.float32))])
    assert _status(warming) == "StatusCode.UNAVAILABLE"
    _assert_serves(gclient)


def test_runtime_failure_is_internal_and_the_server_goes_on(
    grpc_server: ServerHandle, gclient: grpcclient.InferenceServerClient
) -> None:
    before = _metric(grpc_server, "edgepack_inference_failures_total", model="boom")
    with pytest.raises(InferenceServerException) as boom:
        gclient.infer("boom", [_x_input(np.ones((1, 4), np.float32))])
    assert _status(boom) == "StatusCode.INTERNAL" and "the accelerator fell over" in boom.value.message()
    assert _metric(grpc_server, "edgepack_inference_failures_total", model="boom") == before + 1
    _assert_serves(gclient)


def test_too_large_and_malformed_messages(grpc_server: ServerHandle, gclient: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as large:
        gclient.infer("linear", [_x_input(np.ones((MAX_BODY // 16 + 1, 4), np.float32))])
    assert _status(large) == "StatusCode.RESOURCE_EXHAUSTED"
    assert grpc_server.grpc is not None
    with grpc.insecure_channel(grpc_server.grpc.url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as garbage:
            call(b"\xff\xff\xff\xff")
        assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _assert_serves(gclient)


def test_optional_rpcs_are_unimplemented(gclient: grpcclient.InferenceServerClient) -> None:
    for call in (lambda: gclient.get_model_config("linear"), lambda: gclient.get_inference_statistics("linear"),
                 lambda: gclient.get_model_repository_index(), lambda: gclient.load_model("linear")):  # fmt: skip
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert _status(caught) == "StatusCode.UNIMPLEMENTED"
    _assert_serves(gclient)


def test_metrics_count_grpc_requests(grpc_server: ServerHandle, gclient: grpcclient.InferenceServerClient) -> None:
    ok = _metric(grpc_server, "edgepack_inference_requests_total", model="linear", outcome="ok")
    unknown = _metric(grpc_server, "edgepack_inference_requests_total", model="_unknown", outcome="not_found")
    _assert_serves(gclient)
    with pytest.raises(InferenceServerException):
        gclient.infer("made-up-name", [_x_input(np.ones((1, 4), np.float32))])
    assert _metric(grpc_server, "edgepack_inference_requests_total", model="linear", outcome="ok") == ok + 1
    assert _metric(grpc_server, "edgepack_inference_requests_total", model="_unknown", outcome="not_found") == unknown + 1
    assert _metric(grpc_server, "edgepack_inference_requests_total", model="made-up-name") == 0


def test_overload_is_unavailable_shared_with_http_and_the_server_goes_on(
    grpc_server: ServerHandle, gclient: grpcclient.InferenceServerClient, gate: Gate
) -> None:
    gate.open.clear()
    gate.inside = 0
    x = np.ones(3, np.float32)
    results: list = []
    done = threading.Event()

    def callback(result, error) -> None:
        results.append((result, error))
        if len(results) == 1:
            done.set()

    gclient.async_infer("gate", [_x_input(x)], callback)  # one in flight over gRPC
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1.0, 1.0, 1.0]}]})
    http_result: dict = {}

    def post() -> None:
        conn = http.client.HTTPConnection(grpc_server.host, grpc_server.port, timeout=60)
        conn.request("POST", "/v2/models/gate/infer", body=body, headers={"Content-Type": "application/json"})
        http_result["status"] = conn.getresponse().status
        conn.close()

    poster = threading.Thread(target=post)
    poster.start()  # and one over HTTP: the shared bound of 2 is full
    try:
        _wait_until(lambda: gate.inside == 2, "two requests inside the gate")
        refused = _metric(grpc_server, "edgepack_inference_overloaded_total", limit="concurrency")
        with pytest.raises(InferenceServerException) as busy:
            gclient.infer("gate", [_x_input(x)])
        assert _status(busy) == "StatusCode.UNAVAILABLE" and "the server is busy" in busy.value.message()
        assert _metric(grpc_server, "edgepack_inference_overloaded_total", limit="concurrency") == refused + 1
    finally:
        gate.open.set()
        poster.join(30)
    assert done.wait(30) and results[0][1] is None
    np.testing.assert_array_equal(results[0][0].as_numpy("y"), x * 2)
    assert http_result["status"] == 200
    _assert_serves(gclient)


def test_token_is_required_except_for_health() -> None:
    repository = StaticRepository(make_models())
    handle = start_in_thread(repository, port=0, grpc_port=0, token=TOKEN, workers=1)
    try:
        assert handle.grpc is not None
        client = grpcclient.InferenceServerClient(handle.grpc.url)
        assert client.is_server_live() and client.is_server_ready()
        x = [_x_input(np.ones((1, 4), np.float32))]
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}):
            with pytest.raises(InferenceServerException) as refused:
                client.infer("linear", x, headers=headers)
            assert _status(refused) == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as meta:
            client.get_model_metadata("linear")
        assert _status(meta) == "StatusCode.UNAUTHENTICATED"
        _assert_serves_with(client, {"authorization": f"Bearer {TOKEN}"})
        client.close()
    finally:
        handle.stop()


def _assert_serves_with(client: grpcclient.InferenceServerClient, headers: dict[str, str]) -> None:
    x = np.ones((1, 4), np.float32)
    result = client.infer("linear", [_x_input(x)], headers=headers)
    np.testing.assert_allclose(result.as_numpy("y"), x @ W + B, rtol=1e-6)


def test_grpc_port_setting_and_a_taken_port() -> None:
    assert load_config(None).grpc_port is None
    assert load_config(None, {"grpc_port": 8001}).grpc_port == 8001
    repository = StaticRepository(make_models())
    first = start_in_thread(repository, port=0, grpc_port=0, workers=1, metrics=ApiMetrics())
    try:
        assert first.grpc is not None
        from edgepack.errors import ConfigError

        with pytest.raises(ConfigError, match="cannot listen for gRPC"):
            start_in_thread(repository, port=0, grpc_port=first.grpc.port, workers=1)
    finally:
        first.stop()


def test_edgepack_serve_grpc_port_serves_a_real_bundle(tmp_path, keyring, trust) -> None:
    import re
    import subprocess
    import time

    from tests.agent_api.test_serve_cli import _edgepack
    from tests.models import linear_bundle, linear_reference

    bundle, _ = linear_bundle(tmp_path, keyring.keys["release"])
    command = [*_edgepack(), "serve", str(bundle), "--trust", str(trust.directory), "--port", "0", "--grpc-port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "300"})
    try:
        assert process.stderr is not None
        line, deadline = process.stderr.readline(), time.monotonic() + 120
        while "serving" not in line:
            assert (line or process.poll() is None) and time.monotonic() < deadline, "edgepack serve did not serve"
            line = process.stderr.readline()
        port = int(re.search(r"gRPC on 127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_ready() and client.is_model_ready("linear")
        x = np.array([[1, 2, 3, 4]], np.float32)
        result = client.infer("linear", [_x_input(x)])
        np.testing.assert_allclose(result.as_numpy("y"), linear_reference(x, 1.0), rtol=1e-6)
        assert client.get_model_metadata("linear", as_json=True)["platform"] == "onnxruntime_onnx"
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
