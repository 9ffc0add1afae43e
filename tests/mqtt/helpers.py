"""Helpers of the MQTT tests: padded bundles, in-process agents, an event log and an operator."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.config import load_config
from edgepack.agent.link import AgentLink, LinkOptions
from edgepack.agent.service import DeviceAgent
from edgepack.fleet.commands import install_command as fleet_install_command
from edgepack.keys import SigningKey
from edgepack.mqtt import MqttClient, MqttOptions, Received
from edgepack.protocol import (
    CommandTarget,
    InstallCommand,
    RollbackCommand,
    SignedCommand,
    Topics,
    new_command_fields,
    parse_event,
    parse_state,
    sign_command,
)
from edgepack.transfer import ChunkedBundle
from tests.models import linear_bundle

FAST = LinkOptions(stall_s=0.5, need_max_s=2.0, progress_interval_s=0.05, reconnect_min_s=1, reconnect_max_s=1)


def padded_bundle(
    workdir: Path,
    key: SigningKey,
    *,
    version: str = "1.0.0",
    scale: float = 1.0,
    pad: int = 0,
    target: str = "x86",
    selftest_scale: float | None = None,
    name: str = "linear",
) -> Path:
    """A signed linear-model bundle (tests/models.py) with 2 self-test samples and ``pad`` extra bytes."""
    path, _ = linear_bundle(
        workdir, key, name=name, version=version, scale=scale, target=target, selftest_scale=selftest_scale,
        samples=2, pad=pad,
    )  # fmt: skip
    return path


def options(url: str, protocol: str, name: str = "op") -> MqttOptions:
    return MqttOptions(url=url, client_id=f"{name}-{uuid.uuid4().hex[:8]}", protocol=protocol)


def agent_config(state: Path, trust: Path, url: str | None, *, device: str, prefix: str, protocol: str, **extra: Any):
    overrides = {
        "device_id": device,
        "state_dir": str(state),
        "trust_dir": str(trust),
        "targets": ["x86"],
        "listen": "127.0.0.1:0",
        "broker.url": url,
        "broker.prefix": prefix,
        "broker.protocol": protocol,
    }
    overrides.update(extra)
    return load_config(None, overrides)


@dataclass
class RunningAgent:
    agent: DeviceAgent
    link: AgentLink
    api: str

    def infer(self, x: np.ndarray, model: str = "linear") -> np.ndarray:
        return infer(self.api, x, model)

    def serving(self, model: str = "linear") -> str | None:
        current = self.agent.live.current(model)
        return current.version if current else None

    def stop(self) -> None:
        self.link.stop()
        self.agent.close()


def start_agent(
    directory: Path, trust: Path, url: str | None, *, device: str, prefix: str, protocol: str,
    link_options: LinkOptions = FAST, labels: dict[str, str] | None = None, **extra: Any,
) -> RunningAgent:  # fmt: skip
    config = agent_config(
        directory / device, trust, url, device=device, prefix=prefix, protocol=protocol, labels=labels or {}, **extra
    )
    agent = DeviceAgent(config)
    agent.boot()
    handle = agent.start_api(port=0)
    link = AgentLink(agent, link_options)
    link.start()
    return RunningAgent(agent, link, handle.url)


def infer(api: str, x: np.ndarray, model: str = "linear") -> np.ndarray:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    request = urllib.request.Request(
        f"http://{api}/v2/models/{model}/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        out = json.loads(response.read())["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


@dataclass
class EventLog:
    """Every event and state under a prefix, parsed, for assertions."""

    url: str
    protocol: str
    topics: Topics
    events: list[Any] = field(default_factory=list)
    raw: list[Received] = field(default_factory=list)
    _cv: threading.Condition = field(default_factory=threading.Condition)
    client: MqttClient | None = None

    def start(self) -> EventLog:
        self.client = MqttClient(options(self.url, self.protocol, "log"), on_message=self._on_message)
        self.client.subscribe([self.topics.all_events, self.topics.all_states])
        self.client.connect(10)
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()

    def _on_message(self, message: Received) -> None:
        with self._cv:
            self.raw.append(message)
            if message.topic.endswith("/events"):
                self.events.append(parse_event(message.payload))
            self._cv.notify_all()

    def wait_for(self, predicate: Callable[[Any], bool], timeout: float = 20.0, what: str = "an event") -> Any:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    kinds = [(e.kind, getattr(e, "code", None), getattr(e, "reason", None)) for e in self.events[-10:]]
                    raise AssertionError(f"no {what} within {timeout} s; last events: {kinds}")
                self._cv.wait(remaining)

    def wait_for_state(self, device: str, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        """The first retained/live state of ``device`` that satisfies ``predicate``."""
        topic = self.topics.state(device)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for message in self.raw:
                    if message.topic == topic and message.payload and predicate(parse_state(message.payload)):
                        return parse_state(message.payload)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no matching state of {device} within {timeout} s")
                self._cv.wait(remaining)

    def of(self, kind: str, command_id: str | None = None) -> list[Any]:
        with self._cv:
            return [e for e in self.events if e.kind == kind and (command_id is None or e.command_id == command_id)]


def install_command(chunked: ChunkedBundle, to: CommandTarget, **fields: Any) -> InstallCommand:
    return fleet_install_command(chunked, {**new_command_fields(to), **fields})


def rollback_command(model: str, to: CommandTarget) -> RollbackCommand:
    return RollbackCommand(**new_command_fields(to), action="rollback", model=model)


def signed(command: InstallCommand | RollbackCommand, *keys: SigningKey) -> SignedCommand:
    return sign_command(command, keys)
