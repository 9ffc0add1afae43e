"""Fixtures of the MQTT tests: one real mosquitto for the session, a topic prefix per test, both protocols."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from edgepack.protocol import Topics
from tests.mqtt.broker import Mosquitto, find_mosquitto
from tests.mqtt.helpers import EventLog


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    binary = find_mosquitto()
    if binary is None:
        reason = "mosquitto is not installed (scripts/test installs it: apt-get install mosquitto)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    # few messages in flight per client, so that stopping the broker really interrupts a transfer
    broker = Mosquitto(binary, tmp_path_factory.mktemp("mosquitto"), extra_config=("max_inflight_messages 4",))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def broker(mosquitto: Mosquitto) -> Iterator[Mosquitto]:
    """The session's mosquitto, running (a test that stops it gets it started again)."""
    if mosquitto.proc is None:
        mosquitto.start()
    yield mosquitto
    if mosquitto.proc is None:
        mosquitto.start()


@pytest.fixture(params=["3.1.1", "5"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def topics() -> Topics:
    """A fresh prefix per test, so that retained messages of one test never reach another."""
    return Topics(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
def events(broker: Mosquitto, protocol: str, topics: Topics) -> Iterator[EventLog]:
    log = EventLog(broker.url, protocol, topics).start()
    yield log
    log.stop()
