"""Fixtures of the fleet tests: the MQTT tests' real mosquitto and per-test prefix, on MQTT 5 only
(the rollout engine sits above the protocol layer, which tests/mqtt runs on both versions)."""

from __future__ import annotations

import pytest

from tests.mqtt.conftest import broker, events, mosquitto, topics  # noqa: F401 - fixtures used by the tests here


@pytest.fixture
def protocol() -> str:
    return "5"
