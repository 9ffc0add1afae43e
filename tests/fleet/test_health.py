"""The device's health in its retained state (agent/health.py) and the rollout's ``--soak`` judging it:
a device whose new model answers inference requests with server errors during the soak ends ``failed``
with the device's alarm as the reason; a healthy one ``succeeded``; ``fleet devices`` shows both."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from edgepack.agent.health import HealthWatch
from edgepack.fleet.engine import RolloutEngine, create_rollout
from edgepack.fleet.journal import Journal
from edgepack.fleet.plan import RolloutPlan, parse_waves
from edgepack.fleet.registry import health_problem, list_devices
from edgepack.fleet.selectors import Selector
from tests.fleet.agents import faulty_backends, start_device
from tests.mqtt.helpers import options, padded_bundle

pytestmark = pytest.mark.mqtt


def _infer(device, value: float) -> int:
    """POST one KServe v2 inference request to the device's local API; returns the HTTP status."""
    spec = device.agent.live.current("linear").inputs[0]
    shape = [d if isinstance(d, int) else 1 for d in spec.shape]
    body = {"inputs": [{"name": spec.name, "shape": shape, "datatype": "FP32",
                        "data": np.full(shape, value, dtype=np.float32).ravel().tolist()}]}  # fmt: skip
    request = urllib.request.Request(
        f"http://{device.agent.api_url}/v2/models/linear/infer", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_soak_fails_a_device_raising_an_inference_alarm(tmp_path, broker, topics, keyring, trust, monkeypatch):
    monkeypatch.setattr(HealthWatch.shared(), "interval_s", 0.3)
    faulty_backends(monkeypatch)
    key = keyring.keys["release"]
    v1 = padded_bundle(tmp_path, key, version="1.0.0", scale=1.0)
    v2 = padded_bundle(tmp_path, key, version="2.0.0", scale=2.0)
    good = start_device(tmp_path, trust.directory, broker.url, device="cam-good", prefix=topics.prefix,
                        labels={"site": "lyon"}, preinstall=v1)  # fmt: skip
    bad = start_device(tmp_path, trust.directory, broker.url, device="cam-bad", prefix=topics.prefix,
                       labels={"site": "lyon"}, preinstall=v1, fault="infer")  # fmt: skip
    try:
        bad.agent.start_api(port=0)
        before = {r.device: r for r in list_devices(options(broker.url, "5"), prefix=topics.prefix)}
        assert before["cam-bad"].health["ok"] is True and before["cam-bad"].health["ready"] is True
        plan = RolloutPlan(waves=parse_waves("100%"), success_gate=0, soak_s=8.0, chunk_size=16 * 1024,
                           device_timeout_s=60)  # fmt: skip
        journal = Journal(tmp_path / "fleet.sqlite")
        rid = create_rollout(journal, v2, selector="site=lyon", plan=plan, prefix=topics.prefix)
        engine = RolloutEngine(journal, rid, options=options(broker.url, "5"), keys=[key], tick_s=0.05)
        result: dict = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", engine.run()))
        thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = {e.device: e for e in Journal(journal.path).executions(rid)}
            if rows.get("cam-bad") and rows["cam-bad"].state == "soaking":
                break
            time.sleep(0.05)
        assert rows["cam-bad"].state == "soaking", rows["cam-bad"]
        assert bad.serving() == "2.0.0"
        assert _infer(bad, 1.0) == 200  # it serves…
        assert _infer(bad, 1e9) == 500  # …and fails on some requests: a server error, counted
        thread.join(60)
        assert not thread.is_alive()
        rows = {e.device: e for e in journal.executions(rid)}
        assert rows["cam-good"].state == "succeeded", rows["cam-good"]
        assert "healthy for the 8 s soak" in rows["cam-good"].reason
        assert rows["cam-bad"].state == "failed" and rows["cam-bad"].code == "soak", rows["cam-bad"]
        assert "inference_errors: linear" in rows["cam-bad"].reason
        after = {r.device: r for r in list_devices(options(broker.url, "5"), prefix=topics.prefix)}
        assert after["cam-good"].healthy()
        assert "inference_errors: linear" in (health_problem(after["cam-bad"].health) or "")
        picked = list_devices(options(broker.url, "5"), prefix=topics.prefix, selector=Selector.parse("cam-bad"))
        assert [r.device for r in picked] == ["cam-bad"]
    finally:
        good.stop()
        bad.stop()


def test_health_reports_a_model_that_does_not_serve_its_active_bundle(tmp_path, keyring, trust, monkeypatch):
    """At boot the active bundle fails its self-test: the agent serves the previous one and says so."""
    from edgepack.agent.health import HealthMonitor
    from edgepack.agent.service import DeviceAgent
    from tests.mqtt.helpers import agent_config

    key = keyring.keys["release"]
    v1 = padded_bundle(tmp_path, key, version="1.0.0", scale=1.0)
    v2 = padded_bundle(tmp_path, key, version="2.0.0", scale=2.0)
    config = agent_config(tmp_path / "dev", trust.directory, None, device="d", prefix="p", protocol="5")
    agent = DeviceAgent(config)
    agent.boot()
    agent.install(v1)
    agent.install(v2)
    assert HealthMonitor(agent).check().ok
    agent.close()
    faulty_backends(monkeypatch)
    agent = DeviceAgent(config)
    agent.installer.options = dataclasses.replace(agent.installer.options, extra={"fault": "selftest"})
    try:
        agent.boot()  # v2 and v1 both fail the self-test with this runtime: nothing serves
        health = HealthMonitor(agent).check()
        assert not health.ok and not health.ready
        assert "linear" in health.unready
        assert any(a.startswith("selftest: linear") and "serves nothing" in a for a in health.alarms)
    finally:
        agent.close()
