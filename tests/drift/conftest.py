"""Fixtures of the drift and capture tests: the linear model compiled once with reference statistics (the
real compiler, calibration data from N(0, 1)), agents that serve it, and the MQTT tests' real mosquitto."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepack.agent.config import load_config
from edgepack.agent.link.state import StatePublisher
from edgepack.agent.service import DeviceAgent
from edgepack.compiler.pipeline import CompileRequest, compile_model
from edgepack.keys import SigningKey
from edgepack.mqtt import MqttClient, MqttOptions
from edgepack.protocol import DeviceState, encode, parse_state
from edgepack.trust import TrustStore
from tests.models import linear_model
from tests.mqtt.conftest import broker, mosquitto, topics  # noqa: F401 - fixtures used by the tests here

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxslim")

CALIBRATION_SAMPLES = 512


@dataclass(frozen=True)
class Compiled:
    bundle: Path
    calibration: np.ndarray  # [S, 4], one row per sample
    key: SigningKey
    trust: TrustStore
    root: Path


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    root = tmp_path_factory.mktemp("drift")
    key = SigningKey.generate()
    key.save(root / "keys", "release")
    trust = TrustStore.init(root / "trust", [root / "keys" / "release.pub"], threshold=1)
    linear_model(root / "linear.onnx", 1.0)
    x = np.random.default_rng(0).standard_normal((CALIBRATION_SAMPLES, 4)).astype(np.float32)
    np.savez(root / "calibration.npz", x=x)
    compile_model(
        CompileRequest(model=root / "linear.onnx", target="x86", calibration=root / "calibration.npz", keys=[key],
                       output=root / "linear.epk", precision="fp32", name="linear")
    )  # fmt: skip
    return Compiled(root / "linear.epk", x, key, trust, root)


AgentFactory = Callable[..., DeviceAgent]


@pytest.fixture
def make_agent(tmp_path: Path, compiled: Compiled) -> Iterator[AgentFactory]:
    """A DeviceAgent serving the compiled bundle; keyword arguments are dotted config overrides."""
    made: list[DeviceAgent] = []

    def factory(state: Path | None = None, **overrides: Any) -> DeviceAgent:
        config = load_config(None, {
            "state_dir": str(state or tmp_path / f"state{len(made)}"), "trust_dir": str(compiled.trust.directory),
            "targets": ["x86"], "listen": "127.0.0.1:0", **overrides,
        })  # fmt: skip
        agent = DeviceAgent(config)
        made.append(agent)
        agent.boot()
        if agent.live.current("linear") is None:
            agent.install(compiled.bundle)
        return agent

    yield factory
    for agent in made:
        agent.close()


def infer(agent: DeviceAgent, x: np.ndarray) -> np.ndarray:
    """One request through the live slot, as the local API runs it (lease, LiveModel.infer)."""
    with agent.live.acquire("linear") as model:
        return model.infer({"x": x})["y"]


def link_state(agent: DeviceAgent) -> DeviceState:
    """The device state the agent's link would publish, as an operator reads it off the wire."""
    client = MqttClient(MqttOptions(url="mqtt://127.0.0.1:1", client_id="state"))  # never connected
    publisher = StatePublisher(agent, client, "p/devices/d/state", device="d", groups=[], will_delay_s=0,
                               transfer=lambda: None, dropped_events=lambda: 0, notices=lambda: [])  # fmt: skip
    return parse_state(encode(publisher.state(online=True)))
