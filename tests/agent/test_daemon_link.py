"""Serving never depends on the MQTT link: a link that cannot start (no device id, a bug in start) is logged
and the daemon serves on."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from edgepack.agent import daemon
from edgepack.agent.config import load_config
from edgepack.agent.service import DeviceAgent
from tests.mqtt.broker import free_port, wait_port


def _config(tmp_path, trust, **extra):
    overrides = {"state_dir": str(tmp_path / "state"), "trust_dir": str(trust.directory), "targets": ["x86"]}
    overrides.update(extra)
    return load_config(None, overrides)


def test_no_device_id_means_no_link_but_serving(tmp_path, trust, caplog):
    agent = DeviceAgent(_config(tmp_path, trust, **{"broker.url": "mqtt://127.0.0.1:1"}))
    try:
        with caplog.at_level("ERROR"):
            assert daemon.start_link(agent) is None
        assert "no device id" in caplog.text and "serving from the store only" in caplog.text
    finally:
        agent.close()


def test_a_link_that_fails_to_start_does_not_stop_the_daemon(tmp_path, trust, caplog, monkeypatch):
    def broken_start(self):
        raise RuntimeError("a bug in the link")

    monkeypatch.setattr(daemon.AgentLink, "start", broken_start)
    port = free_port()
    config = _config(tmp_path, trust, device_id="cam-1", listen=f"127.0.0.1:{port}",
                     **{"broker.url": f"mqtt://127.0.0.1:{free_port()}"})  # fmt: skip
    stop = threading.Event()
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            daemon.run(config, stop=stop)
        except BaseException as exc:  # the daemon must not die
            failures.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    with caplog.at_level("ERROR"):
        thread.start()
        try:
            wait_port(port, up=True, timeout=30)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=10) as response:
                assert response.status == 200
            assert thread.is_alive() and not failures
        finally:
            stop.set()
            thread.join(30)
    assert not failures, failures
    assert "a bug in the link" in caplog.text and "serving from the store only" in caplog.text


@pytest.mark.parametrize("payload", [b"{", b'{"version": 1, "pending": 5}'])
def test_a_corrupt_command_book_is_reported_not_fatal(tmp_path, trust, payload):
    config = _config(tmp_path, trust, device_id="cam-1", **{"broker.url": f"mqtt://127.0.0.1:{free_port()}"})
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "commands.json").write_bytes(payload)
    agent = DeviceAgent(config)
    link = daemon.start_link(agent)
    try:
        assert link is not None
        assert link.status()["notices"] and "corrupt" in link.status()["notices"][0]
        state = link.state.state(online=True)
        assert any("commands.json was corrupt" in n for n in state.notices)
        assert json.loads((tmp_path / "state" / "commands.json").read_text())["pending"] == []
    finally:
        if link is not None:
            link.stop(timeout=2)
        agent.close()
