"""Honest readiness: the server is ready only when every model the device should serve is loaded and
self-tested; a model whose load failed stays not ready (with the reason) until a good one is in its slot."""

from __future__ import annotations

import http.client
import json
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgepack.agent.config import load_config
from edgepack.agent.install import Installer
from edgepack.agent.live import ActiveModels, LiveModel, LiveModels
from edgepack.agent.service import DeviceAgent
from edgepack.agent.store import DeviceStore, ModelState, StoreState
from edgepack.errors import InstallError, ModelNotFoundError, ModelNotReadyError, RuntimeBackendError
from edgepack.runtimes.base import get_backend
from tests.models import linear_bundle

X = np.ones((1, 4), dtype=np.float32)
TOKEN = "ready-token"


def _committed_store(state_dir: Path, trust, key, tmp_path: Path, version: str = "1.0.0") -> str:
    """A store with ``linear`` committed (no previous bundle to fall back to); returns its digest."""
    live = LiveModels()
    try:
        path, _ = linear_bundle(tmp_path, key, version=version)
        return Installer(DeviceStore(state_dir), live, trust).install(path).digest
    finally:
        live.close_all()


@pytest.fixture
def start_agent(tmp_path, trust) -> Iterator:
    agents: list[DeviceAgent] = []

    def start(state_dir: Path, token: str | None = None) -> DeviceAgent:
        config = load_config(
            None,
            {"state_dir": str(state_dir), "trust_dir": str(trust.directory), "listen": "127.0.0.1:0", "token": token},
        )
        agent = DeviceAgent(config)
        agents.append(agent)
        agent.start_api()  # before boot, as `edgepack serve` does: readiness is honest while models load too
        return agent

    yield start
    for agent in agents:
        agent.close()


def _get(agent: DeviceAgent, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    handle = agent._api
    assert handle is not None
    conn = http.client.HTTPConnection(handle.host, handle.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_good_store_is_ready(tmp_path, trust, keyring, start_agent) -> None:
    state = tmp_path / "state"
    _committed_store(state, trust, keyring.keys["release"], tmp_path)
    agent = start_agent(state)
    status, doc = _get(agent, "/v2/health/ready")
    assert (status, doc["not_ready"]) == (503, {"linear": "not loaded yet"})  # listening, boot not done yet
    assert _get(agent, "/v2/models/linear/ready") == (
        503,
        {"name": "linear", "ready": False, "reason": "not loaded yet"},
    )
    agent.boot()
    assert _get(agent, "/v2/health/ready") == (200, {"ready": True})
    assert _get(agent, "/v2/models/linear/ready") == (200, {"name": "linear", "ready": True})


def test_corrupt_payload_keeps_server_and_model_not_ready(tmp_path, trust, keyring, start_agent) -> None:
    state = tmp_path / "state"
    digest = _committed_store(state, trust, keyring.keys["release"], tmp_path)
    model_file = DeviceStore(state).bundle_dir(digest) / "model.onnx"
    model_file.write_bytes(b"\0" * model_file.stat().st_size)  # same size, wrong bytes: the hash catches it
    agent = start_agent(state)
    loaded = agent.boot()
    assert loaded == {}
    status, doc = _get(agent, "/v2/health/ready")
    assert status == 503 and doc["ready"] is False
    assert list(doc["not_ready"]) == ["linear"] and doc["not_ready"]["linear"].startswith("not loaded: ")
    status, doc = _get(agent, "/v2/models/linear/ready")
    assert status == 503 and doc["ready"] is False and "not loaded" in doc["reason"]
    with pytest.raises(ModelNotReadyError, match="linear"), agent.live.acquire("linear"):
        pass
    # a good, newer bundle fills the slot: ready again
    agent.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.1.0")[0])
    assert _get(agent, "/v2/health/ready") == (200, {"ready": True})
    assert _get(agent, "/v2/models/linear/ready")[0] == 200


def test_runtime_that_refuses_the_model_keeps_it_not_ready(tmp_path, trust, keyring, start_agent, monkeypatch) -> None:
    state = tmp_path / "state"
    _committed_store(state, trust, keyring.keys["release"], tmp_path)

    def refuse(self, *args, **kwargs):
        raise RuntimeBackendError("onnxruntime cannot load model.onnx: this device's runtime refuses it")

    monkeypatch.setattr(type(get_backend("onnxruntime")), "load", refuse)
    agent = start_agent(state, token=TOKEN)
    agent.boot()
    status, doc = _get(agent, "/v2/health/ready")
    assert (status, doc) == (503, {"ready": False, "not_ready": 1})  # without the token: how many, not which
    status, doc = _get(agent, "/v2/health/ready", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 503 and "runtime refuses it" in doc["not_ready"]["linear"]
    status, doc = _get(agent, "/v2/models/linear/ready", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 503 and "runtime refuses it" in doc["reason"]
    # the failed load of a newer version changes nothing: still not ready, the reason is the latest failure
    with pytest.raises(InstallError):
        agent.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.2.0")[0])
    status, doc = _get(agent, "/v2/models/linear/ready", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 503 and "runtime refuses it" in doc["reason"]
    monkeypatch.undo()
    agent.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.3.0")[0])
    assert _get(agent, "/v2/health/ready") == (200, {"ready": True})


def test_failed_first_install_of_a_new_model_does_not_make_the_server_unready(
    tmp_path, trust, keyring, start_agent
) -> None:
    state = tmp_path / "state"
    _committed_store(state, trust, keyring.keys["release"], tmp_path)
    agent = start_agent(state)
    agent.boot()
    bad, _ = linear_bundle(tmp_path, keyring.keys["release"], name="other", selftest_scale=3.0)
    with pytest.raises(InstallError):
        agent.install(bad)  # self-test fails: never committed, so the device is not meant to serve it
    assert _get(agent, "/v2/health/ready") == (200, {"ready": True})
    status, doc = _get(agent, "/v2/models/other/ready")
    assert status == 503 and "self-test" in doc["reason"].lower()


# --- LiveModels alone ----------------------------------------------------------------------------


class _Runtime:
    def __init__(self) -> None:
        self.inputs: list = []
        self.outputs: list = []

    def infer(self, feeds):
        return {}

    def close(self) -> None:
        pass


def _model(name: str, version: str) -> LiveModel:
    manifest = types.SimpleNamespace(name=name, version=version, runtime=types.SimpleNamespace(name="onnxruntime"))
    return LiveModel(manifest, "d" * 64, _Runtime())  # type: ignore[arg-type]


def test_live_models_wait_for_every_expected_and_required_name() -> None:
    expected = {"a"}
    live = LiveModels(expected=lambda: expected)
    assert live.unready_models() == {"a": "not loaded yet"} and not live.server_ready()
    assert live.ready("a") is False
    with pytest.raises(ModelNotFoundError):
        live.ready("nobody")
    assert {"name": "a", "version": "", "state": "UNAVAILABLE", "reason": "not loaded yet"} in live.index()
    live.swap("a", _model("a", "1.0.0"))
    assert live.server_ready() and live.ready("a")
    live.require("b")  # e.g. the bundle `edgepack serve` was given
    assert live.unready_models() == {"b": "not loaded yet"}
    live.note_failure("b", "stage failed: self-test output 'y' differs")
    assert live.unready_models() == {"b": "not loaded: stage failed: self-test output 'y' differs"}
    live.swap("b", _model("b", "2.0.0"))
    assert live.server_ready()
    expected.add("c")  # state.json gained a model: readiness follows
    assert list(live.unready_models()) == ["c"]
    live.close_all()


def test_active_models_follow_state_json(tmp_path) -> None:
    store = DeviceStore(tmp_path / "state")
    active = ActiveModels(store)
    assert active() == frozenset()
    store.commit_state(StoreState({"a": ModelState(active="1" * 64), "b": ModelState(previous="2" * 64)}))
    assert active() == {"a"}  # only names with an active bundle
    store.commit_state(StoreState({"a": ModelState(active="1" * 64), "c": ModelState(active="3" * 64)}))
    assert active() == {"a", "c"}
