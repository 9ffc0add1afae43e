"""A real uvicorn server on a free 127.0.0.1 port, serving the fake models, for tritonclient to call;
and, after the run, how many fuzz inputs the API's fuzz tests tried, by kind (the counts notes quote)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import tritonclient.http as httpclient

from edgepack.agent.api import ApiMetrics, ServerHandle, start_in_thread
from edgepack.agent.api.static_repository import StaticRepository
from tests.agent_api.fakes import make_models
from tests.agent_api.fuzzing import COUNTS, OUTCOMES

MAX_BODY = 256 * 1024
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def metrics() -> ApiMetrics:
    return ApiMetrics()


@pytest.fixture(scope="module")
def repository() -> StaticRepository:
    repository = StaticRepository(make_models())
    repository.set_ready("warming", False)
    return repository


@pytest.fixture(scope="module")
def server(repository: StaticRepository, metrics: ApiMetrics) -> Iterator[ServerHandle]:
    metrics.set_active("linear", "1.0.0")
    handle = start_in_thread(repository, port=0, max_body_bytes=MAX_BODY, workers=4, metrics=metrics)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(server.url, concurrency=4)
    yield c
    c.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not COUNTS:
        return
    terminalreporter.section("local API fuzz inputs tried, by kind")
    for kind, n in sorted(COUNTS.items()):
        terminalreporter.write_line(f"{n:7d}  {kind}")
    terminalreporter.write_line(f"{sum(COUNTS.values()):7d}  in all")
    terminalreporter.section("local API fuzz outcomes")
    for kind, n in sorted(OUTCOMES.items()):
        terminalreporter.write_line(f"{n:7d}  {kind}")
