"""Capture upload over a real mosquitto: a broker restart mid-upload loses nothing and duplicates nothing,
records leave the device only when acknowledged, and what `fleet capture pull` writes is calibration data
that the compiler takes as it is."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
from typer.testing import CliRunner

from edgepack.agent.field_data import FieldData
from edgepack.agent.link import AgentLink, LinkOptions
from edgepack.bundle import read_info
from edgepack.cli import app
from edgepack.compiler.pipeline import CompileRequest, compile_model
from edgepack.datasets import load_samples
from edgepack.fleet.capture import CapturePuller
from edgepack.keys import SigningKey
from edgepack.mqtt import MqttOptions
from tests.drift.conftest import infer, link_state

RECORDS = 60
FAST = LinkOptions(reconnect_min_s=1, reconnect_max_s=1, stall_s=0.5, need_max_s=2.0)


def _capturing_agent(make_agent, broker, topics, device="cam-1", **extra):
    return make_agent(**{
        "device_id": device, "broker.url": broker.url, "broker.prefix": topics.prefix, "broker.protocol": "5",
        "drift.queue": 100_000, "capture.enabled": True, "capture.chunk_size": 256, "capture.ack_timeout_s": 2.0,
        "capture.models": {"linear": {"inputs": ["x"], "random_share": 1.0}}, **extra,
    })  # fmt: skip


def _operator(broker, name="op") -> MqttOptions:
    return MqttOptions(url=broker.url, client_id=f"{name}-{time.monotonic_ns()}", protocol="5", reconnect_min_s=1,
                       reconnect_max_s=1)  # fmt: skip


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_a_broker_restart_mid_upload_loses_nothing_and_duplicates_nothing(make_agent, broker, topics, compiled,
                                                                          tmp_path):  # fmt: skip
    agent = _capturing_agent(make_agent, broker, topics)
    rng = np.random.default_rng(9)
    sent = [rng.standard_normal((16, 4)).astype(np.float32) for _ in range(RECORDS)]  # ~4 chunks per record
    for x in sent:
        infer(agent, x)
    assert agent.field_data.flush() and len(agent.field_data.buffer.records()) == RECORDS
    link = AgentLink(agent, FAST)
    link.start()
    try:
        assert _wait(lambda: link.connected)
        puller = CapturePuller(_operator(broker), "cam-1", tmp_path / "pulled", [compiled.key], prefix=topics.prefix)
        result = {}
        thread = threading.Thread(target=lambda: result.update(report=puller.run(timeout=90)))
        thread.start()
        assert _wait(lambda: puller.report.records >= 8)
        broker.stop()  # mid-upload: chunks and acknowledgements in flight are lost with the broker
        at_stop = puller.report.records
        time.sleep(0.5)
        broker.start()
        thread.join(100)
        report = result["report"]
    finally:
        link.stop()
    assert at_stop < RECORDS, "the upload finished before the broker went down"
    assert report.complete and report.held == 0
    files = sorted((tmp_path / "pulled" / "linear").glob("*.npz"))
    assert len(files) == report.records == RECORDS  # every record once
    got = sorted(np.load(f)["x"][0].tobytes() for f in files)
    assert got == sorted(x.tobytes() for x in sent)  # nothing lost, nothing twice, bytes intact
    assert agent.field_data.buffer.records() == []  # deleted on the device once acknowledged
    assert agent.field_data.buffer.status()["uploaded"] == RECORDS


def test_pulled_files_are_calibration_data_for_the_compiler(make_agent, broker, topics, compiled, tmp_path):
    agent = _capturing_agent(make_agent, broker, topics, device="cam-2")
    rng = np.random.default_rng(10)
    for _ in range(12):
        infer(agent, rng.standard_normal((1, 4)).astype(np.float32))
    assert agent.field_data.flush()
    assert link_state(agent).capture.records == 12  # the state tells the operator what waits
    link = AgentLink(agent, FAST)
    link.start()
    try:
        assert _wait(lambda: link.connected)
        result = CliRunner().invoke(app, [
            "fleet", "capture", "pull", "--device", "cam-2", "-o", str(tmp_path / "pulled"), "--key",
            str(compiled.root / "keys" / "release.key"), "--broker", broker.url, "--prefix", topics.prefix,
            "--protocol", "5", "--timeout", "60", "--json",
        ])  # fmt: skip
    finally:
        link.stop()
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["complete"] and report["records"] == 12 and report["held"] == 0
    assert link_state(agent).capture.records == 0 and link_state(agent).capture.uploaded == 12
    folder = tmp_path / "pulled" / "linear"
    samples = load_samples(folder, read_info(compiled.bundle).manifest.inputs, what="calibration data")
    assert len(samples) == 12
    request = CompileRequest(model=compiled.root / "linear.onnx", target="x86", calibration=folder,
                             keys=[compiled.key], output=tmp_path / "recalibrated.epk", precision="fp32")  # fmt: skip
    result = compile_model(request)  # the pulled folder, as it is, is the calibration data
    assert result.accuracy.passed


def test_an_unsigned_or_foreign_pull_sends_nothing(make_agent, broker, topics, tmp_path):
    agent = _capturing_agent(make_agent, broker, topics, device="cam-3")
    infer(agent, np.zeros((1, 4), np.float32))
    assert agent.field_data.flush()
    link = AgentLink(agent, FAST)
    link.start()
    try:
        assert _wait(lambda: link.connected)
        stranger = SigningKey.generate()  # a well-formed, signed pull, by a key the device does not trust
        report = CapturePuller(_operator(broker), "cam-3", tmp_path / "pulled", [stranger],
                               prefix=topics.prefix).run(timeout=3)  # fmt: skip
        assert not report.complete and report.records == 0
        assert link.capture is not None and link.capture.rejected >= 1
    finally:
        link.stop()
    assert len(agent.field_data.buffer.records()) == 1  # still on the device


def test_fleet_devices_shows_drift_and_capture(make_agent, broker, topics, tmp_path):
    agent = _capturing_agent(make_agent, broker, topics, device="cam-4", **{
        "drift.budget_ms_per_s": 1000.0, "capture.models": {"linear": {"inputs": ["x"], "random_share": 0.05}},
    })  # fmt: skip
    rng, dead = np.random.default_rng(1), np.array([1, 1, 0, 1], np.float32)
    for _ in range(400):
        infer(agent, rng.standard_normal((1, 4)).astype(np.float32) * dead)
    assert agent.field_data.flush()
    link = AgentLink(agent, FAST)
    link.start()
    try:
        assert _wait(lambda: link.connected)
        link.state.publish()
        common = ["fleet", "devices", "--broker", broker.url, "--prefix", topics.prefix, "--protocol", "5"]
        as_json = CliRunner().invoke(app, [*common, "--json"])
        table = CliRunner().invoke(app, common, env={"COLUMNS": "300"})
    finally:
        link.stop()
    assert as_json.exit_code == 0, as_json.output
    (device,) = json.loads(as_json.output)
    assert device["models"]["linear"]["drift"]["level"] == "alarm"
    held = agent.field_data.buffer.status()["records"]
    assert device["capture"]["records"] == held > 0
    assert table.exit_code == 0, table.output
    assert "linear alarm (x[2] psi" in table.output and f"capture: {held} waiting" in table.output


def test_the_operator_turns_capture_on_with_deploy_and_off_again(make_agent, broker, topics, compiled, tmp_path):
    agent = make_agent(**{"device_id": "cam-5", "broker.url": broker.url, "broker.prefix": topics.prefix,
                          "broker.protocol": "5", "capture.enabled": True, "drift.queue": 100_000})  # fmt: skip
    assert agent.live.current("linear").observer.rules is None  # enabled, but no model opted in yet
    (tmp_path / "capture.toml").write_text('inputs = ["x"]\nrandom_share = 1.0\n')
    common = ["--broker", broker.url, "--prefix", topics.prefix, "--protocol", "5",
              "--key", str(compiled.root / "keys" / "release.key")]  # fmt: skip
    link = AgentLink(agent, FAST)
    link.start()
    try:
        assert _wait(lambda: link.connected)
        deployed = CliRunner().invoke(app, ["deploy", str(compiled.bundle), "--device", "cam-5", "--capture",
                                            str(tmp_path / "capture.toml"), "--journal", str(tmp_path / "j.sqlite"),
                                            *common])  # fmt: skip
        assert deployed.exit_code == 0, deployed.output
        assert _wait(lambda: agent.live.current("linear").observer.rules is not None)
        for _ in range(3):
            infer(agent, np.ones((1, 4), np.float32))
        assert agent.field_data.flush() and len(agent.field_data.buffer.records()) == 3
        off = CliRunner().invoke(app, ["fleet", "capture", "set", "--device", "cam-5", "--model", "linear", "--off",
                                       *common])  # fmt: skip
        assert off.exit_code == 0, off.output
        assert _wait(lambda: agent.live.current("linear").observer.rules is None)
    finally:
        link.stop()
    infer(agent, np.ones((1, 4), np.float32))
    assert agent.field_data.flush() and len(agent.field_data.buffer.records()) == 3  # off: nothing more
    assert not agent.field_data.configure("linear", {"inputs": ["x"], "random_share": 1.0}, seq=1)  # replayed
    config = agent.config  # after a restart: the operator's configs (and their seq) are kept on disk
    again = FieldData(config.drift, config.capture, config.state_dir, bundle_dir=agent.store.bundle_dir)
    assert again.capture_for("linear") is None
    assert not again.configure("linear", {"inputs": ["x"], "random_share": 1.0}, seq=1)
    bad = CliRunner().invoke(app, ["fleet", "capture", "set", "--device", "cam-5", "--model", "linear",
                                   "--settings", str(tmp_path / "capture.toml"), "--off", *common])  # fmt: skip
    assert bad.exit_code != 0


def test_a_capture_config_is_ignored_where_the_device_keeps_capture_off(make_agent):
    agent = make_agent()  # [capture] enabled = false (the default)
    assert not agent.field_data.configure("linear", {"inputs": ["x"], "random_share": 1.0}, seq=10**15)
    assert agent.field_data.buffer is None and agent.live.current("linear").observer.rules is None
