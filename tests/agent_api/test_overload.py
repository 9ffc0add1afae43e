"""The load bound: past N requests in flight (or their queued body bytes) the API answers 503 with
Retry-After at once, the admitted requests finish, and the server goes on serving.

A "gate" model holds every request inside ``infer`` until the test opens it, so the requests in flight
are known exactly (no sleeps, no timing assertions).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgepack.agent.api import ApiMetrics, ServerHandle, start_in_thread
from edgepack.agent.api.admission import Admission, default_max_bytes, default_max_requests
from edgepack.agent.api.static_repository import StaticRepository
from edgepack.errors import ServerOverloadedError
from edgepack.manifest import TensorSpec
from tests.agent_api.fakes import FunctionModel, make_models
from tests.agent_api.helpers import assert_serves

N = 3  # requests the bound admits
K = 2  # requests beyond it


class Gate:
    """Holds requests inside the model until opened; counts how many are inside."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.inside = 0
        self._lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.inside += 1
        assert self.open.wait(60), "the test never opened the gate"
        return {"y": inputs["x"] * 2}


def _gate_model(gate: Gate) -> FunctionModel:
    spec = [TensorSpec(name="x", dtype="float32", shape=["n"])]
    out = [TensorSpec(name="y", dtype="float32", shape=["n"])]
    return FunctionModel("gate", "1.0.0", spec, out, gate)


def _body(n: int) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [n], "data": [1.0] * n}]}).encode()


def _post(server: ServerHandle, body: bytes, results: list, index: int) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.request("POST", "/v2/models/gate/infer", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        results[index] = (response.status, response.getheader("Retry-After"), response.read())
    finally:
        conn.close()


def _wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _samples(server: ServerHandle) -> dict:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def gated() -> Iterator[tuple[ServerHandle, Gate]]:
    gate = Gate()
    handle = start_in_thread(
        StaticRepository([*make_models(), _gate_model(gate)]),
        port=0,
        workers=N,
        max_concurrent_requests=N,
        metrics=ApiMetrics(),
    )
    yield handle, gate
    gate.open.set()
    handle.stop()


def _start(server: ServerHandle, bodies: list[bytes], results: list, offset: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=_post, args=(server, b, results, offset + i)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    return threads


def test_requests_past_the_concurrency_bound_get_503_with_retry_after(gated) -> None:
    server, gate = gated
    results: list = [None] * (N + K)
    admitted = _start(server, [_body(4)] * N, results, 0)
    _wait_until(lambda: gate.inside == N and server.app.admission.in_flight == N, f"{N} requests in the model")
    refused = _start(server, [_body(4)] * K, results, N)
    for t in refused:
        t.join(30)
    for status, retry_after, body in results[N:]:
        assert status == 503 and retry_after == "1"
        assert "busy" in json.loads(body)["error"] and f"bound is {N}" in json.loads(body)["error"]
    gate.open.set()
    for t in admitted:
        t.join(30)
    for status, _, body in results[:N]:
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == [2.0] * 4
    # the server keeps serving, and /metrics counts the refusals and the gauges are back to zero
    _post(server, _body(2), results, 0)
    assert results[0][0] == 200
    samples = _samples(server)
    assert samples[("edgepack_inference_overloaded_total", (("limit", "concurrency"),))] == K
    assert samples[("edgepack_inference_requests_total", (("model", "gate"), ("outcome", "overloaded")))] == K
    assert samples[("edgepack_inference_requests_total", (("model", "gate"), ("outcome", "ok")))] == N + 1
    assert samples[("edgepack_inference_in_flight", ())] == 0
    assert samples[("edgepack_inference_queued_bytes", ())] == 0


def test_requests_past_the_queued_bytes_bound_get_503() -> None:
    gate = Gate()
    body = _body(2000)
    handle = start_in_thread(
        StaticRepository([_gate_model(gate), *make_models()]),
        port=0,
        workers=4,
        max_concurrent_requests=16,
        max_queued_bytes=int(2.5 * len(body)),
        metrics=ApiMetrics(),
    )
    try:
        results: list = [None] * 4
        admitted = _start(handle, [body, body], results, 0)
        _wait_until(lambda: gate.inside == 2, "two requests in the model")
        assert handle.app.admission.queued_bytes == 2 * len(body)
        _post(handle, body, results, 2)
        status, retry_after, answer = results[2]
        assert status == 503 and retry_after == "1" and "body bytes" in json.loads(answer)["error"]
        admitted += _start(handle, [_body(1)], results, 3)  # a small one still fits
        _wait_until(lambda: gate.inside == 3, "the small request in the model")
        gate.open.set()
        for t in admitted:
            t.join(30)
        assert [r[0] for r in results] == [200, 200, 503, 200]
        # alone, a body larger than the byte bound (but under the body cap) is always let through
        big = _body(int(3 * len(body) / 4))
        assert len(big) > handle.app.admission.max_bytes
        _post(handle, big, results, 0)
        assert results[0][0] == 200
        samples = _samples(handle)
        assert samples[("edgepack_inference_overloaded_total", (("limit", "queued_bytes"),))] == 1
    finally:
        gate.open.set()
        handle.stop()


def test_unknown_model_names_do_not_mint_labels_when_refused(gated) -> None:
    server, gate = gated
    results: list = [None] * (N + 1)
    admitted = _start(server, [_body(1)] * N, results, 0)
    _wait_until(lambda: server.app.admission.in_flight == N, f"{N} requests admitted")
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("POST", "/v2/models/made-up-name/infer", body=_body(1))
    assert conn.getresponse().status == 503
    conn.close()
    gate.open.set()
    for t in admitted:
        t.join(30)
    samples = _samples(server)
    assert samples[("edgepack_inference_requests_total", (("model", "_unknown"), ("outcome", "overloaded")))] == 1
    assert not any(dict(labels).get("model") == "made-up-name" for _, labels in samples)
    assert_serves_linear(server)


def assert_serves_linear(server: ServerHandle) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.url)
    try:
        assert_serves(client)
    finally:
        client.close()


def test_admission_counts_and_defaults() -> None:
    admission = Admission(2, 100, ApiMetrics())
    a = admission.admit(60)
    with pytest.raises(ServerOverloadedError, match="body bytes"):
        admission.admit(50)
    b = admission.admit(40)
    with pytest.raises(ServerOverloadedError, match="2 inference requests are in flight"):
        admission.admit(0)
    with pytest.raises(ServerOverloadedError):
        b.grow(41)  # a body that turns out larger than it said no longer fits
    a.release()
    b.grow(90)  # alone now: it may grow to anything (the body cap still holds)
    assert (admission.in_flight, admission.queued_bytes) == (1, 90)
    b.release()
    b.release()  # twice is harmless
    assert (admission.in_flight, admission.queued_bytes) == (0, 0)
    assert default_max_requests(2) == 8
    assert 64 << 20 <= default_max_bytes(64 << 20) <= 4 * (64 << 20)
