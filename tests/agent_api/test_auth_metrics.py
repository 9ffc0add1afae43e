"""Bearer token, Prometheus metrics, and the repository protocols."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from edgepack.agent.api import ApiMetrics, ModelRepository, ServedModel, ServerHandle, start_in_thread
from edgepack.agent.api.static_repository import StaticRepository
from tests.agent_api.conftest import TOKEN
from tests.agent_api.fakes import make_models
from tests.agent_api.helpers import assert_serves, error_of, raw, x_input


@pytest.fixture(scope="module")
def guarded_server() -> Iterator[ServerHandle]:
    handle = start_in_thread(StaticRepository(make_models()), port=0, token=TOKEN, workers=2)
    yield handle
    handle.stop()


def test_health_stays_open_with_a_token(guarded_server: ServerHandle) -> None:
    assert raw(guarded_server, "GET", "/v2/health/live")[0] == 200
    assert raw(guarded_server, "GET", "/v2/health/ready")[0] == 200


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({}, "needs a bearer token"),
        ({"Authorization": "Bearer wrong"}, "token is wrong"),
        ({"Authorization": f"Basic {TOKEN}"}, "token is wrong"),
    ],
)
def test_missing_or_bad_token(guarded_server: ServerHandle, headers: dict[str, str], fragment: str) -> None:
    for method, path in (("GET", "/v2"), ("GET", "/v2/models/linear"), ("POST", "/v2/models/linear/infer")):
        status, answer_headers, data = raw(guarded_server, method, path, b"{}", headers)
        assert status == 401, path
        assert answer_headers["www-authenticate"] == "Bearer"
        assert fragment in error_of(data)


def test_right_token_through_tritonclient(guarded_server: ServerHandle) -> None:
    client = httpclient.InferenceServerClient(guarded_server.url)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("linear")
        assert info.value.status() == "401"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get_model_metadata("linear", headers=headers)["name"] == "linear"
        x = np.ones((1, 4), np.float32)
        assert client.infer("linear", [x_input(x)], headers=headers).as_numpy("y").shape == (1, 3)
    finally:
        client.close()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_text_parses_and_counts(
    server: ServerHandle, client: httpclient.InferenceServerClient, metrics: ApiMetrics
) -> None:
    assert_serves(client)
    with pytest.raises(InferenceServerException):
        client.infer("no-such-model", [x_input(np.ones((1, 4), np.float32))])
    with pytest.raises(InferenceServerException):
        client.infer("boom", [x_input(np.ones((1, 4), np.float32))])
    metrics.swaps.inc()
    metrics.set_active("linear", "1.1.0")  # a swap: the old version's gauge goes away
    status, headers, body = raw(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = _samples(body.decode())
    assert samples[("edgepack_inference_requests_total", (("model", "linear"), ("outcome", "ok")))] >= 1
    assert samples[("edgepack_inference_requests_total", (("model", "_unknown"), ("outcome", "not_found")))] >= 1
    assert samples[("edgepack_inference_requests_total", (("model", "boom"), ("outcome", "error")))] >= 1
    assert samples[("edgepack_inference_failures_total", (("error", "RuntimeError"), ("model", "boom")))] >= 1
    assert samples[("edgepack_inference_request_duration_seconds_count", (("model", "linear"),))] >= 1
    assert samples[("edgepack_active_model", (("model", "linear"), ("version", "1.1.0")))] == 1
    assert ("edgepack_active_model", (("model", "linear"), ("version", "1.0.0"))) not in samples
    assert samples[("edgepack_model_swaps_total", ())] == 1
    assert samples[("edgepack_model_rollbacks_total", ())] == 0


def test_fakes_satisfy_the_protocols() -> None:
    repository = StaticRepository(make_models())
    assert isinstance(repository, ModelRepository)
    with repository.acquire("linear") as model:
        assert isinstance(model, ServedModel)
        assert model.version == "1.0.0"
