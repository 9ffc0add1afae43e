"""In-process devices for the fleet tests: a real DeviceAgent (onnxruntime) and AgentLink per device, with
an optional fault: ``selftest`` makes this device's runtime answer off by one, so the bundle's self-test
fails on it and nowhere else; ``infer`` makes it raise on inputs of 1e6 or more (inference errors that
pass the self-test)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import edgepack.agent.install as install_module
from edgepack.agent.link import AgentLink, LinkOptions
from edgepack.agent.service import DeviceAgent
from edgepack.runtimes.base import LoadedModel, RuntimeBackend, get_backend
from tests.mqtt.helpers import agent_config

FAST = LinkOptions(stall_s=0.5, need_max_s=2.0, progress_interval_s=0.05, reconnect_min_s=1, reconnect_max_s=1)


class _OffByOne(LoadedModel):
    def __init__(self, inner: LoadedModel) -> None:
        self.inner, self.inputs, self.outputs = inner, inner.inputs, inner.outputs

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v + 1 for k, v in self.inner.infer(inputs).items()}

    def close(self) -> None:
        self.inner.close()


class _FailsOnLarge(LoadedModel):
    """Serves normally (self-test passes) but raises on any input value of 1e6 or more: inference errors."""

    def __init__(self, inner: LoadedModel) -> None:
        self.inner, self.inputs, self.outputs = inner, inner.inputs, inner.outputs

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if any(np.abs(v).max() >= 1e6 for v in inputs.values()):
            raise RuntimeError("injected inference failure")
        return self.inner.infer(inputs)

    def close(self) -> None:
        self.inner.close()


class _FaultyBackend(RuntimeBackend):
    name, extra, module = "faulty", "", ""

    def __init__(self, inner: RuntimeBackend) -> None:
        self.inner = inner

    def installed_version(self) -> str | None:  # type: ignore[override]
        return self.inner.installed_version()

    def load(self, model_path: Path, **kwargs: Any) -> LoadedModel:
        model = self.inner.load(model_path, **kwargs)
        options = kwargs.get("options")
        fault = options.extra.get("fault") if options is not None else None
        if fault == "selftest":
            return _OffByOne(model)
        if fault == "infer":
            return _FailsOnLarge(model)
        return model


def faulty_backends(monkeypatch: Any) -> None:
    """Make the installer's runtime honour a device's ``fault`` (in its RuntimeOptions.extra)."""
    monkeypatch.setattr(install_module, "get_backend", lambda name: _FaultyBackend(get_backend(name)))


@dataclass
class Device:
    agent: DeviceAgent
    link: AgentLink

    def serving(self, model: str = "linear") -> str | None:
        current = self.agent.live.current(model)
        return current.version if current else None

    def stop(self) -> None:
        self.link.stop()
        self.agent.close()


def start_device(
    root: Path, trust: Path, url: str, *, device: str, prefix: str, labels: dict[str, str] | None = None,
    fault: str | None = None, preinstall: Path | None = None, protocol: str = "5", link_options: LinkOptions = FAST,
) -> Device:  # fmt: skip
    config = agent_config(root / device, trust, url, device=device, prefix=prefix, protocol=protocol,
                          labels=labels or {})  # fmt: skip
    agent = DeviceAgent(config)
    agent.boot()
    if preinstall is not None and agent.live.current("linear") is None:
        agent.install(preinstall)
    if fault:
        agent.installer.options = dataclasses.replace(agent.installer.options, extra={"fault": fault})
    link = AgentLink(agent, link_options)
    link.start()
    return Device(agent, link)
