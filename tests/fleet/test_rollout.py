"""Rollouts to real agents (onnxruntime, in-process) over a real mosquitto: a canary wave and a group that
grows while the rollout is open; a third of the devices failing self-test aborting the rollout and the
updated ones rolled back; a device offline during the rollout updated when it returns."""

from __future__ import annotations

import threading
import time

import pytest

from edgepack.fleet.engine import RolloutEngine, create_rollout
from edgepack.fleet.journal import Journal
from edgepack.fleet.plan import AbortRule, RolloutPlan, parse_waves
from edgepack.mqtt import MqttClient
from tests.fleet.agents import faulty_backends, start_device
from tests.mqtt.helpers import options, padded_bundle

pytestmark = pytest.mark.mqtt


def _bundles(tmp_path, keyring):
    key = keyring.keys["release"]
    v1 = padded_bundle(tmp_path, key, version="1.0.0", scale=1.0)
    v2 = padded_bundle(tmp_path, key, version="2.0.0", scale=2.0, pad=40_000)
    return v1, v2


def _engine(tmp_path, broker, topics, keyring, bundle, selector, plan, **kw):
    journal = Journal(tmp_path / "fleet.sqlite")
    rid = create_rollout(journal, bundle, selector=selector, plan=plan, prefix=topics.prefix)
    engine = RolloutEngine(journal, rid, options=options(broker.url, "5"), keys=[keyring.keys["release"]],
                           tick_s=0.05, **kw)  # fmt: skip
    return journal, rid, engine


def _retained_commands(broker, topics) -> list[str]:
    """Topics of the retained device commands the broker holds under the prefix."""
    seen: list[str] = []
    client = MqttClient(options(broker.url, "5", "probe"), on_message=lambda m: seen.append(m.topic) if m.payload else None)
    client.subscribe([f"{topics.prefix}/devices/+/cmd", f"{topics.prefix}/groups/+/cmd"])
    client.connect(10)
    time.sleep(1.0)
    client.stop()
    return seen


def test_canary_waves_and_a_device_joining_midway(tmp_path, broker, topics, keyring, trust):
    v1, v2 = _bundles(tmp_path, keyring)
    devices = [start_device(tmp_path, trust.directory, broker.url, device=f"cam-{i:02d}", prefix=topics.prefix,
                            labels={"site": "lyon"}, preinstall=v1) for i in range(10)]  # fmt: skip
    devices.append(start_device(tmp_path, trust.directory, broker.url, device="other", prefix=topics.prefix,
                                labels={"site": "paris"}, preinstall=v1))  # fmt: skip
    late = None
    try:
        plan = RolloutPlan(waves=parse_waves("1,30%,100%"), success_gate=95, soak_s=1.0, chunk_size=16 * 1024,
                           device_timeout_s=60)  # fmt: skip
        journal, rid, engine = _engine(tmp_path, broker, topics, keyring, v2, "site=lyon", plan)
        result: dict = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", engine.run()))
        thread.start()
        # the canary alone first: one device notified, the others queued until it has soaked
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = {e.device: e for e in Journal(journal.path).executions(rid)}
            if any(e.state == "succeeded" for e in rows.values()):
                break
            notified = [e for e in rows.values() if e.state != "queued"]
            assert len(notified) <= 1, [(e.device, e.state) for e in notified]
            time.sleep(0.05)
        canary = [e for e in rows.values() if e.state == "succeeded"]
        assert len(canary) == 1 and canary[0].wave == 0
        # a device that joins the group while the rollout is open gets the bundle too
        late = start_device(tmp_path, trust.directory, broker.url, device="cam-late", prefix=topics.prefix,
                            labels={"site": "lyon"}, preinstall=v1)  # fmt: skip
        thread.join(120)
        assert not thread.is_alive()
        rollout = result["r"]
        assert rollout.status == "completed", rollout.reason
        rows = {e.device: e for e in journal.executions(rid)}
        assert set(rows) == {f"cam-{i:02d}" for i in range(10)} | {"cam-late"}
        assert {e.state for e in rows.values()} == {"succeeded"}
        waves = [e.wave for e in rows.values()]
        assert waves.count(0) == 1 and waves.count(1) in (2, 3)  # 30% of 10, or of 11 once cam-late has joined
        assert all(d.serving() == "2.0.0" for d in devices[:10]) and late.serving() == "2.0.0"
        assert devices[10].serving() == "1.0.0"  # not in the selector
        assert all(e.previous_version == "1.0.0" and e.attempts == 1 for e in rows.values())
        assert _retained_commands(broker, topics) == []  # a closed rollout leaves no command behind
    finally:
        for d in devices + ([late] if late else []):
            d.stop()


def test_a_third_failing_selftest_aborts_and_rolls_back(tmp_path, broker, topics, keyring, trust, monkeypatch):
    faulty_backends(monkeypatch)
    v1, v2 = _bundles(tmp_path, keyring)
    faulty = {1, 4, 7}  # cam-01, cam-04, cam-07: the bundle's self-test fails on these only
    devices = [start_device(tmp_path, trust.directory, broker.url, device=f"cam-{i:02d}", prefix=topics.prefix,
                            labels={"group": "cams"}, preinstall=v1, fault="selftest" if i in faulty else None)
               for i in range(10)]  # fmt: skip
    try:
        # canary cam-00 passes; wave 2 (cumulative 50% = 5) holds cam-01 and cam-04: 2 of 4 fail -> below the gate
        plan = RolloutPlan(waves=parse_waves("1,50%,100%"), success_gate=95, rollback_on_abort=True,
                           abort_rules=[AbortRule.parse("failed:50%:6")], chunk_size=16 * 1024,
                           device_timeout_s=60)  # fmt: skip
        journal, rid, engine = _engine(tmp_path, broker, topics, keyring, v2, "cams", plan)
        rollout = engine.run()
        assert rollout.status == "aborted"
        assert "below the 95% success gate" in rollout.reason
        rows = {e.device: e for e in journal.executions(rid)}
        states = {d: e.state for d, e in rows.items()}
        assert states == {
            "cam-00": "rolled_back", "cam-01": "failed", "cam-02": "rolled_back", "cam-03": "rolled_back",
            "cam-04": "failed", **{f"cam-0{i}": "canceled" for i in range(5, 10)},
        }  # fmt: skip
        assert rows["cam-01"].code == "selftest" and "self-test" in (rows["cam-01"].reason or "").lower()
        # every device ends on the previous version: the healthy ones were rolled back over MQTT
        assert all(d.serving() == "1.0.0" for d in devices)
        for i in (0, 2, 3):
            model = devices[i].agent.store.load_state().model("linear")
            assert devices[i].agent.store.manifest(model.active).version == "1.0.0"
        assert _retained_commands(broker, topics) == []
    finally:
        for d in devices:
            d.stop()


def test_abort_rule_stops_a_single_wave_rollout(tmp_path, broker, topics, keyring, trust, monkeypatch):
    faulty_backends(monkeypatch)
    v1, v2 = _bundles(tmp_path, keyring)
    devices = [start_device(tmp_path, trust.directory, broker.url, device=f"cam-{i}", prefix=topics.prefix,
                            labels={"group": "cams"}, preinstall=v1, fault="selftest" if i % 2 else None)
               for i in range(4)]  # fmt: skip
    try:
        plan = RolloutPlan(waves=parse_waves("100%"), abort_rules=[AbortRule.parse("all:40%:2")],
                           rollback_on_abort=False, chunk_size=16 * 1024, device_timeout_s=60)  # fmt: skip
        journal, rid, engine = _engine(tmp_path, broker, topics, keyring, v2, "cams", plan)
        rollout = engine.run()
        assert rollout.status == "aborted" and rollout.reason.startswith("abort rule all:40%:2")
        states = {e.device: e.state for e in journal.executions(rid)}
        assert states["cam-1"] == states["cam-3"] == "failed"
        assert {states["cam-0"], states["cam-2"]} <= {"succeeded", "canceled"}
    finally:
        for d in devices:
            d.stop()


def test_an_offline_device_is_updated_when_it_returns(tmp_path, broker, topics, events, keyring, trust):
    v1, v2 = _bundles(tmp_path, keyring)
    devices = [start_device(tmp_path, trust.directory, broker.url, device=f"cam-{i}", prefix=topics.prefix,
                            labels={"group": "cams"}, preinstall=v1) for i in range(3)]  # fmt: skip
    events.wait_for_state("cam-2", lambda s: s.online and "linear" in s.models)
    devices[2].stop()  # offline: its retained state says so
    events.wait_for_state("cam-2", lambda s: not s.online)
    back = None
    try:
        plan = RolloutPlan(waves=parse_waves("100%"), offline_wait_s=120, chunk_size=16 * 1024, device_timeout_s=60)
        journal, rid, engine = _engine(tmp_path, broker, topics, keyring, v2, "cams", plan)
        result: dict = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", engine.run()))
        thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = {e.device: e.state for e in Journal(journal.path).executions(rid)}
            if rows.get("cam-0") == rows.get("cam-1") == "succeeded":
                break
            time.sleep(0.05)
        assert rows["cam-2"] == "queued"  # not sent anything while offline; the rollout stays open
        back = start_device(tmp_path, trust.directory, broker.url, device="cam-2", prefix=topics.prefix,
                            labels={"group": "cams"})  # fmt: skip
        thread.join(60)
        assert result["r"].status == "completed"
        assert {e.state for e in journal.executions(rid)} == {"succeeded"}
        assert back.serving() == "2.0.0"
    finally:
        for d in devices[:2] + ([back] if back else []):
            d.stop()
