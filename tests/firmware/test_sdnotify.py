"""agent/sdnotify.py: the datagrams systemd would receive, on a socket the test binds, and the daemon's use."""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

import pytest

from edgepack.agent import daemon
from edgepack.agent.config import load_config
from edgepack.agent.sdnotify import Notifier, Watchdog

WAIT_S = 20.0  # generous: the machine may be busy; the tests wait for messages, they never time them


class FakeSystemd:
    """A bound datagram socket standing in for systemd's notification socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)

    def receive(self, timeout: float = WAIT_S) -> list[str]:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode().split("\n")


@pytest.fixture
def systemd(tmp_path: Path):
    fake = FakeSystemd(str(tmp_path / "notify.sock"))
    fake.address = str(tmp_path / "notify.sock")
    yield fake
    fake.sock.close()


def test_ready_status_and_stopping_are_sent(systemd):
    notifier = Notifier(systemd.address)
    assert notifier.ready("serving 1 model\non 127.0.0.1:8000")
    assert systemd.receive() == ["READY=1", "STATUS=serving 1 model on 127.0.0.1:8000"]
    assert notifier.status("installing")
    assert systemd.receive() == ["STATUS=installing"]
    assert notifier.stopping()
    assert systemd.receive() == ["STOPPING=1"]


def test_abstract_namespace_address():
    name = f"edgepack-test-{os.getpid()}-{threading.get_ident()}"
    fake = FakeSystemd("\0" + name)
    try:
        assert Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).ready()
        assert fake.receive() == ["READY=1"]
    finally:
        fake.sock.close()


def test_no_socket_is_a_no_op():
    notifier = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.ready("x") is False and notifier.watchdog() is False and notifier.stopping() is False
    watchdog = Watchdog(notifier, {"api": lambda: True})
    watchdog.start()
    assert watchdog._thread is None  # nothing to ping
    watchdog.stop()


def test_unreachable_socket_warns_and_goes_on(tmp_path, caplog, monkeypatch):
    # Earlier tests in the same process may have raised the "edgepack" level or disabled loggers (a library's
    # logging.config call); pin this module's logger so the warning is looked for, not filtered away.
    monkeypatch.setattr(logging.getLogger("edgepack.agent.sdnotify"), "disabled", False)
    with caplog.at_level(logging.WARNING, logger="edgepack.agent.sdnotify"):
        assert Notifier(str(tmp_path / "gone.sock")).ready() is False
    assert "cannot notify systemd" in caplog.text


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    mine = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(mine).watchdog_interval == 0.1
    other = {**mine, "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_env(other).watchdog_interval is None  # meant for another process
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x"}).watchdog_interval is None


def test_watchdog_pings_while_alive_and_stops_when_wedged(systemd):
    alive = threading.Event()
    alive.set()
    notifier = Notifier.from_env({"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "100000"})
    watchdog = Watchdog(notifier, {"api": alive.is_set})
    assert watchdog.interval == 0.05
    watchdog.start()
    try:
        assert [systemd.receive() for _ in range(4)] == [["WATCHDOG=1"]] * 4
        alive.clear()  # the API stops answering
        while (message := systemd.receive()) == ["WATCHDOG=1"]:
            pass  # a ping decided before the check failed may still arrive
        assert message == ["STATUS=wedged: api not answering"]
        with pytest.raises(TimeoutError):  # no ping while wedged: systemd restarts the agent after WatchdogSec
            systemd.receive(timeout=0.5)
        alive.set()
        assert systemd.receive() == ["WATCHDOG=1"]  # recovered: pings again
    finally:
        watchdog.stop()


def test_a_raising_check_counts_as_failing():
    def broken() -> bool:
        raise ConnectionRefusedError("no API")

    assert Watchdog(Notifier(None), {"api": broken, "link": lambda: True}).failing() == ["api"]


def test_daemon_sends_ready_then_pings_then_stopping(systemd, tmp_path, trust, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    overrides = {"state_dir": str(tmp_path / "state"), "trust_dir": str(trust.directory), "listen": "127.0.0.1:0"}
    stop = threading.Event()
    thread = threading.Thread(target=daemon.run, args=(load_config(None, overrides),), kwargs={"stop": stop})
    thread.start()
    try:
        ready = systemd.receive()
        assert ready[0] == "READY=1" and ready[1].startswith("STATUS=serving on http://127.0.0.1:")
        assert systemd.receive() == ["WATCHDOG=1"]
        assert systemd.receive() == ["WATCHDOG=1"]  # the API answered its liveness check
    finally:
        stop.set()
        thread.join(WAIT_S)
    assert not thread.is_alive()
    messages = []
    while (message := systemd.receive()) != ["STOPPING=1"]:
        messages.append(tuple(message))
    assert set(messages) <= {("WATCHDOG=1",)}


class _FakeLink:
    """What link_alive looks at: the worker thread and status() (which takes the link's lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._worker: threading.Thread | None = threading.Thread(target=self.stop.wait, daemon=True)
        self._worker.start()

    def status(self) -> dict:
        with self.lock:
            return {}


def test_link_check_fails_when_the_worker_died_or_the_lock_is_stuck():
    from edgepack.agent.sdnotify import link_alive

    link = _FakeLink()
    check = link_alive(link, timeout=0.5)
    assert check()
    with link.lock:  # a worker wedged holding the link's lock
        assert not check()
    assert check()
    link.stop.set()
    link._worker.join(WAIT_S)
    assert not check()  # the worker thread is gone


def test_api_check_against_a_real_api(tmp_path):
    from edgepack.agent.api.server import start_in_thread
    from edgepack.agent.live import LiveModels
    from edgepack.agent.sdnotify import api_alive

    handle = start_in_thread(LiveModels(), port=0, token="secret")  # health stays open with a token
    try:
        assert api_alive(handle)()
    finally:
        handle.stop()
    with pytest.raises(OSError):
        api_alive(handle, timeout=1.0)()  # nobody answers: the watchdog counts it as failing
