"""One process per state directory: a second agent is refused with the holder named; SIGKILL frees the lock.

The lock is an ``flock`` on ``STATE/lock`` (agent/store_lock.py), taken by every DeviceAgent for its life.
The CLI's standalone ``agent install`` builds one too, so it is refused next to any holder that has no
control socket, and so is ``agent status`` (reading a store may repair it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from edgepack.agent.config import load_config
from edgepack.agent.service import DeviceAgent
from edgepack.agent.store_lock import StoreLock, holder_pid, read_holder
from edgepack.errors import StoreLockedError
from tests.models import linear_bundle

HOLDER = textwrap.dedent(
    """
    import sys, time
    from edgepack.agent.config import load_config
    from edgepack.agent.service import DeviceAgent

    agent = DeviceAgent(load_config(None, {"state_dir": sys.argv[1], "trust_dir": sys.argv[2]}))
    print("held", flush=True)
    time.sleep(600)
    """
)


def _config(tmp_path, trust):
    return load_config(None, {"state_dir": str(tmp_path / "state"), "trust_dir": str(trust.directory)})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"}
    )  # fmt: skip


def test_second_agent_on_one_state_dir_is_refused_naming_the_first(tmp_path, trust):
    config = _config(tmp_path, trust)
    first = DeviceAgent(config)
    try:
        with pytest.raises(StoreLockedError) as refused:
            DeviceAgent(config)
        message = str(refused.value)
        assert f"PID {os.getpid()}" in message and "since" in message, message
        assert "edgepack agent install|rollback|status" in message  # says what to do
        assert refused.value.holder.pid == os.getpid() == holder_pid(config.state_dir)  # the kernel agrees
    finally:
        first.close()
    second = DeviceAgent(config)  # released on close
    second.close()


def test_lock_note_names_the_holder_and_hides_secrets(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/edgepack", "agent", "run", "--token", "s3cret", "--password=hunter2"])
    with StoreLock.acquire(tmp_path / "state") as lock:
        holder = read_holder(tmp_path / "state")
        assert holder is not None and holder.pid == os.getpid() and holder.since
        assert holder.command.startswith("edgepack agent run --token")
        assert "s3cret" not in holder.command and "hunter2" not in holder.command
        lock.update(control_socket="/run/x.sock")
        assert read_holder(tmp_path / "state").control_socket == "/run/x.sock"
        assert lock.held
    assert not lock.held


def test_lock_is_released_when_its_holder_is_sigkilled(tmp_path, trust):
    config = _config(tmp_path, trust)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(config.state_dir), str(config.trust_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        with pytest.raises(StoreLockedError, match=f"PID {holder.pid} "):
            DeviceAgent(config)
        assert holder_pid(config.state_dir) == holder.pid
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        assert holder_pid(config.state_dir) is None
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)
    agent = DeviceAgent(config)  # no stale lock: the kernel dropped it with the process
    assert agent.lock.holder.pid == os.getpid()
    agent.close()


def test_cli_install_is_refused_while_another_process_holds_the_store(tmp_path, trust, keyring):
    config = _config(tmp_path, trust)
    bundle, _ = linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0")
    holder = DeviceAgent(config)  # a holder without a control socket (like `edgepack serve`)
    try:
        done = _cli("agent", "install", str(bundle), "--trust", str(trust.directory), "--state", str(config.state_dir))
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"PID {os.getpid()}" in done.stderr and "in use" in done.stderr, done.stderr
        assert not (config.state_dir / "state.json").exists()
        assert list((config.state_dir / "journal").iterdir()) == []

        shown = _cli("agent", "status", "--state", str(config.state_dir), "--json")
        assert shown.returncode == 1 and f"PID {os.getpid()}" in shown.stderr, shown.stderr
    finally:
        holder.close()


def test_cli_standalone_install_holds_the_lock_and_lets_go(tmp_path, trust, keyring):
    config = _config(tmp_path, trust)
    bundle, _ = linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0")
    done = _cli("agent", "install", str(bundle), "--trust", str(trust.directory), "--state", str(config.state_dir))
    assert done.returncode == 0, done.stderr
    assert "committed linear 1.0.0" in done.stdout
    assert "agent install" in read_holder(config.state_dir).command  # it held the store while installing
    shown = _cli("agent", "status", "--state", str(config.state_dir), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["models"]["linear"]["active"]["version"] == "1.0.0"
    DeviceAgent(config).close()  # both CLI processes let go of it

    missing = _cli("agent", "install", str(bundle), "--state", str(config.state_dir))
    assert missing.returncode == 1 and "--trust" in missing.stderr, missing.stderr
