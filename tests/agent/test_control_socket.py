"""``edgepack agent install|rollback|status`` next to a running ``edgepack agent run`` go through its socket.

A real daemon process (no broker) holds the state directory; the CLI, as another process, hands it
installs and rollbacks over the control socket (agent/control.py), so the daemon's API serves them, its
journal numbers run on, and nobody deletes the bundles it serves from. The socket is private (0600 in a
0700 directory, peer uid checked), answers garbage with errors and keeps serving; SIGKILL frees the store.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgepack.agent.config import load_config
from edgepack.agent.control import StatusRequest, ask_daemon
from edgepack.agent.service import DeviceAgent
from edgepack.agent.store_lock import read_holder
from edgepack.errors import StoreLockedError
from tests.models import linear_bundle, linear_reference
from tests.mqtt.broker import free_port
from tests.mqtt.helpers import infer

X = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    state: Path
    api: str
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, timeout=300, env=env
    )


def _journal_numbers(state: Path) -> list[int]:
    return sorted(int(p.name.split("-", 1)[0]) for p in (state / "journal").glob("*.json"))


@pytest.fixture
def daemon(tmp_path, trust, keyring):
    """`edgepack agent run` on a store that already serves linear 1.0.0 (scale 1), no broker."""
    state = tmp_path / "state"
    config = load_config(None, {"state_dir": str(state), "trust_dir": str(trust.directory), "targets": ["x86"]})
    first = DeviceAgent(config)
    first.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=1.0)[0])
    first.close()
    port, log = free_port(), tmp_path / "agent.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgepack", "-v", "agent", "run", "--device-id", "cam-1", "--state", str(state),
             "--trust", str(trust.directory), "--listen", f"127.0.0.1:{port}", "--target", "x86"],
            stdout=out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    running = Daemon(proc, state, f"127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 120
        while ask_daemon(state, StatusRequest()) is None:
            assert proc.poll() is None, f"the daemon exited: {running.tail()}"
            assert time.monotonic() < deadline, f"no control socket within 120 s: {running.tail()}"
            time.sleep(0.2)
        yield running
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


def test_cli_install_rollback_and_status_run_inside_the_daemon(daemon, tmp_path, trust, keyring):
    state = daemon.state
    np.testing.assert_allclose(infer(daemon.api, X), linear_reference(X, 1.0), rtol=1e-5)
    assert _journal_numbers(state) == [1]

    for number, (version, scale) in enumerate([("1.1.0", 2.0), ("1.2.0", 3.0)], start=2):
        bundle, _ = linear_bundle(tmp_path, keyring.keys["release"], version=version, scale=scale)
        done = _cli("agent", "install", str(bundle), "--state", str(state))  # no --trust: the daemon's own
        assert done.returncode == 0, done.stdout + done.stderr + daemon.tail()
        assert f"committed linear {version}" in done.stdout and f"by the daemon (PID {daemon.proc.pid})" in done.stdout
        np.testing.assert_allclose(infer(daemon.api, X), linear_reference(X, scale), rtol=1e-5)
        assert _journal_numbers(state) == list(range(1, number + 1))  # one counter, in one process

    done = _cli("agent", "rollback", "linear", "--state", str(state))
    assert done.returncode == 0, done.stdout + done.stderr + daemon.tail()
    assert "rolled back linear to 1.1.0" in done.stdout
    np.testing.assert_allclose(infer(daemon.api, X), linear_reference(X, 2.0), rtol=1e-5)
    assert _journal_numbers(state) == [1, 2, 3, 4]

    shown = _cli("agent", "status", "--state", str(state), "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["daemon"]["pid"] == daemon.proc.pid
    assert status["models"]["linear"]["serving"] == "1.1.0"  # only the daemon knows what is loaded
    active = status["models"]["linear"]["active"]
    assert active["version"] == "1.1.0" and (state / "bundles" / active["bundle"] / "manifest.json").is_file()
    assert [j["outcome"] for j in status["recent_installs"]] == ["committed"] * 4
    table = _cli("agent", "status", "--state", str(state))
    assert table.returncode == 0 and f"daemon PID {daemon.proc.pid}" in table.stdout, table.stdout + table.stderr

    refused = _cli("agent", "rollback", "nothing-here", "--state", str(state))  # the daemon's error, as ours
    assert refused.returncode == 1 and "no previous bundle" in refused.stderr, refused.stderr
    bad = tmp_path / "bad.epk"
    bad.write_bytes(b"not a bundle")
    refused = _cli("agent", "install", str(bad), "--state", str(state))
    assert refused.returncode == 1 and "refused bad.epk" in refused.stderr, refused.stderr

    config = load_config(None, {"state_dir": str(state), "trust_dir": str(trust.directory)})
    with pytest.raises(StoreLockedError, match=f"PID {daemon.proc.pid} "):
        DeviceAgent(config)  # and nothing else may open the store beside it
    np.testing.assert_allclose(infer(daemon.api, X), linear_reference(X, 2.0), rtol=1e-5)

    # the bundle travels as an open descriptor: the daemon installs what the caller opened, even from a
    # path it cannot see (a service with PrivateTmp=, another user's directory)
    bundle, _ = linear_bundle(tmp_path, keyring.keys["release"], version="1.3.0", scale=4.0)
    with open(bundle, "rb") as fh:
        replies = _exchange(_socket(state), b'{"op": "install", "path": "/elsewhere/v4.epk"}\n', fds=[fh.fileno()])
    assert replies[0]["ok"] is True and replies[0]["result"]["version"] == "1.3.0", replies
    np.testing.assert_allclose(infer(daemon.api, X), linear_reference(X, 4.0), rtol=1e-5)
    assert _journal_numbers(state) == [1, 2, 3, 4, 5]
    assert list((state / "uploads").iterdir()) == []  # the copy is gone after the install


def _socket(state: Path) -> str:
    path = read_holder(state).control_socket
    assert path is not None
    return path


def _exchange(path: str, payload: bytes, *, shut: bool = True, fds: list[int] | None = None) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(path)
        sent = socket.send_fds(sock, [payload], fds) if fds else 0
        sock.sendall(payload[sent:])
        if shut:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


GARBAGE = [
    b"not json\n",
    b"\xff\xfe\x00\x01\n",
    b"[1, 2, 3]\n",
    b'{"op": "format-disk"}\n',
    b'{"op": "install"}\n',
    b'{"op": "install", "path": 7}\n',
    b'{"op": "install", "path": "relative.epk"}\n',
    b'{"op": "install", "path": "/nonexistent/x.epk"}\n',
    b'{"op": "install", "path": "/etc"}\n',
    b'{"op": "rollback", "name": "nope"}\n',
    b'{"op": "status", "extra": true}\n',
    b'{"op": "status"',  # no newline, then EOF
    b"x" * 200_000,  # longer than a request may be
]


def test_control_socket_is_private_and_survives_garbage(daemon, tmp_path, trust):
    path = _socket(daemon.state)
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
    assert stat.S_IMODE(os.stat(Path(path).parent).st_mode) == 0o700

    for payload in GARBAGE:
        replies = _exchange(path, payload)
        assert len(replies) == 1 and replies[0]["ok"] is False and replies[0]["error"], (payload[:40], replies)
    read_end, write_end = os.pipe()
    try:  # a descriptor that is not a regular file
        replies = _exchange(path, b'{"op": "install", "path": "/x.epk"}\n', fds=[read_end])
    finally:
        os.close(read_end)
        os.close(write_end)
    assert replies[0]["ok"] is False and "not a regular file" in replies[0]["error"], replies
    replies = _exchange(path, b'{"op": "status"}\n\n{"op": "nope"}\n{"op": "status"}\n')  # several per connection
    assert [r["ok"] for r in replies] == [True, False, True]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)  # and one that says nothing at all
    assert daemon.proc.poll() is None, daemon.tail()
    assert ask_daemon(daemon.state, StatusRequest())["models"]["linear"]["serving"] == "1.0.0"
    np.testing.assert_allclose(infer(daemon.api, X), linear_reference(X, 1.0), rtol=1e-5)

    # SIGKILL: the kernel drops the lock with the process; the next one takes the store at once
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(30)
    assert ask_daemon(daemon.state, StatusRequest()) is None  # a dead daemon's socket does not answer
    shown = _cli("agent", "status", "--state", str(daemon.state), "--json")
    assert shown.returncode == 0, shown.stderr
    config = load_config(None, {"state_dir": str(daemon.state), "trust_dir": str(trust.directory)})
    DeviceAgent(config).close()


PEER = """
import os, socket, sys
directory = os.open(os.path.dirname(sys.argv[1]), os.O_PATH)  # as root: the test's tmp dirs are 0700
os.setgid(65534)
os.setuid(65534)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(30)
sock.connect(f"/proc/self/fd/{directory}/{os.path.basename(sys.argv[1])}")
try:
    sock.sendall(b'{"op": "status"}\\n')
except BrokenPipeError:  # the daemon may have refused and closed already; its reply is still to be read
    pass
sys.stdout.write(sock.makefile("rb").readline().decode())
"""


def test_control_socket_refuses_another_uid(daemon):
    if os.geteuid() != 0:
        reason = "needs root to run a client as another uid (uid 65534)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    path = read_holder(daemon.state).control_socket
    # loosen the file modes, as a careless admin might: the peer-credential check still refuses
    os.chmod(Path(path).parent, 0o755)
    os.chmod(path, 0o666)
    done = subprocess.run([sys.executable, "-I", "-c", PEER, path], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["ok"] is False and "uid 65534" in reply["error"], reply
    assert daemon.proc.poll() is None and ask_daemon(daemon.state, StatusRequest()) is not None


def test_state_path_too_long_for_a_socket_address_gets_a_private_runtime_dir(tmp_path, trust, monkeypatch):
    from edgepack.agent.control import ControlServer

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    state = tmp_path / ("deep-" * 30) / "state"
    agent = DeviceAgent(load_config(None, {"state_dir": str(state), "trust_dir": str(trust.directory)}))
    server = ControlServer(agent).start()
    try:
        path = server.path
        assert path.parent.parent == tmp_path and read_holder(state).control_socket == str(path)
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert ask_daemon(state, StatusRequest())["daemon"]["pid"] == os.getpid()
    finally:
        server.stop()
        agent.close()
    assert not path.parent.exists() and read_holder(state).control_socket is None
