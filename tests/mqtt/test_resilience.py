"""The agent as a process: killed mid-transfer it resumes with what it has; with no broker it serves anyway.

Also: events are buffered (bounded) while offline, and the embedded broker (amqtt, MQTT 3.1.1 only) works
with the same clients, which fall back from MQTT 5 by themselves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgepack.agent.config import load_config
from edgepack.agent.receiver import ChunkReceiver
from edgepack.agent.service import DeviceAgent
from edgepack.fleet.deploy import Deployer, deploy
from edgepack.protocol import CommandTarget, ProgressEvent, ResultEvent
from edgepack.transfer import chunk_bundle
from tests.models import linear_reference
from tests.mqtt.broker import free_port, wait_port
from tests.mqtt.helpers import FAST, infer, install_command, options, padded_bundle, signed, start_agent

pytestmark = pytest.mark.mqtt

X = np.random.default_rng(11).standard_normal((2, 4)).astype(np.float32)


def _agent_process(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child owns it
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "edgepack", "-v", "agent", "run", *args], stdout=out, stderr=out, env=env
    )


def test_resume_after_agent_killed(tmp_path, broker, protocol, topics, events, keyring, trust):
    port, chunk = free_port(), 32 * 1024
    args = [
        "--device-id", "cam-1", "--broker", broker.url, "--prefix", topics.prefix, "--protocol", protocol,
        "--state", str(tmp_path / "state"), "--trust", str(trust.directory), "--listen", f"127.0.0.1:{port}",
        "--target", "x86", "--max-rate", "400k", "--stall", "0.5",
    ]  # fmt: skip
    log = tmp_path / "agent.log"
    first = _agent_process(args, log)
    second = None
    operator = Deployer(options(broker.url, protocol), topics)
    try:
        events.wait_for_state("cam-1", lambda s: s.online, timeout=30)
        chunked = chunk_bundle(padded_bundle(tmp_path, keyring.keys["release"], scale=2.0, pad=1_500_000), chunk)
        size = chunked.index.size
        operator.connect()
        operator.publish_bundle(chunked)
        command = signed(install_command(chunked, CommandTarget(device="cam-1")), keyring.keys["release"])
        operator.send(command)
        events.wait_for(lambda e: isinstance(e, ProgressEvent) and e.held_bytes > 0.3 * size, what="30% downloaded")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        events.wait_for_state("cam-1", lambda s: not s.online)  # the broker published the last will
        on_disk = ChunkReceiver(tmp_path / "state" / "incoming").open(chunked.index)
        held = on_disk.held_bytes
        on_disk.close()
        assert 0 < held < size

        second = _agent_process(args, log)
        result = operator.wait(command.command.id, ["cam-1"], 60)["cam-1"]
        assert result.outcome == "committed", (result, log.read_text()[-3000:])
        counters = result.transfer
        assert counters["resumed_bytes"] >= held  # everything the killed agent had written counts
        assert counters["resumed_bytes"] + counters["received_bytes"] == size  # fetched only what was missing
        assert counters["duplicate_bytes"] <= chunk
        resumed = [e for e in events.of("accepted", command.command.id) if e.resumed]
        assert resumed, "the restarted agent resumes the pending command by itself"
        np.testing.assert_allclose(infer(f"127.0.0.1:{port}", X), linear_reference(X, 2.0), rtol=1e-5)
        assert not (tmp_path / "state" / "incoming" / chunked.bundle).exists()  # partial transfer cleaned up
    finally:
        operator.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)


def test_broker_down_the_agent_starts_and_serves_from_its_store(tmp_path, keyring, trust):
    state = tmp_path / "state"
    nowhere = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there, for the whole test
    config = load_config(None, {"state_dir": str(state), "trust_dir": str(trust.directory), "targets": ["x86"]})
    earlier = DeviceAgent(config)
    earlier.install(padded_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=3.0))
    earlier.close()

    # the daemon, as a device runs it: the API answers from the store although the broker never does
    port = free_port()
    started = time.monotonic()
    proc = _agent_process(
        ["--device-id", "cam-1", "--broker", nowhere, "--state", str(state), "--trust", str(trust.directory),
         "--listen", f"127.0.0.1:{port}", "--target", "x86"],
        tmp_path / "agent.log",
    )  # fmt: skip
    try:
        wait_port(port, up=True, timeout=30)
        np.testing.assert_allclose(infer(f"127.0.0.1:{port}", X), linear_reference(X, 3.0), rtol=1e-5)
        assert time.monotonic() - started < 30
        assert proc.poll() is None
    finally:
        proc.terminate()
        assert proc.wait(10) == 0

    # in process: events are buffered while offline, bounded, progress dropped first
    device = start_agent(tmp_path / "inproc", trust.directory, nowhere, device="cam-2", prefix="t", protocol="auto",
                         link_options=FAST, state_dir=str(state), **{"broker.max_buffered_events": 5})  # fmt: skip
    try:
        assert device.serving() == "1.0.0"
        np.testing.assert_allclose(device.infer(X), linear_reference(X, 3.0), rtol=1e-5)
        base = {"device": "cam-2", "at": "2026-01-01T00:00:00Z"}
        device.link.events.emit(ResultEvent(**base, outcome="failed", model="m", reason="kept"))
        for i in range(10):
            device.link.events.emit(ProgressEvent(**base, phase="download", held_bytes=i))
        status = device.link.status()
        assert not status["connected"] and status["buffered_events"] == 5 and status["dropped_events"] == 6
        assert any(isinstance(e, ResultEvent) for e in device.link.events.buffered)
    finally:
        device.stop()


def test_embedded_broker_with_auto_protocol(tmp_path, keyring, trust):
    pytest.importorskip("amqtt")
    from edgepack.broker import EmbeddedBroker

    embedded = EmbeddedBroker(port=free_port())
    embedded.start()
    device = None
    try:
        device = start_agent(tmp_path, trust.directory, embedded.url, device="cam-1", prefix="demo", protocol="auto")
        assert device.link.client.wait_connected(10)
        assert device.link.client.protocol == "3.1.1"  # amqtt speaks 3.1.1 only: the client fell back
        bundle = padded_bundle(tmp_path, keyring.keys["release"], scale=4.0, pad=3000)
        report = deploy(
            bundle, options=options(embedded.url, "auto"), keys=[keyring.keys["release"]], device="cam-1",
            prefix="demo", wait=True, timeout=30, chunk_size=1024,
        )  # fmt: skip
        assert report.ok, report.devices
        np.testing.assert_allclose(device.infer(X), linear_reference(X, 4.0), rtol=1e-5)
    finally:
        if device is not None:
            device.stop()
        embedded.stop()
