"""The operator SIGKILLed in the middle of a rollout and resumed from its journal: no device updated twice,
none skipped; a second operator on the same journal refused; pause, status and the JSON lines of the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from edgepack.fleet.journal import Journal
from tests.fleet.agents import start_device
from tests.mqtt.helpers import padded_bundle

pytestmark = pytest.mark.mqtt


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgepack", *args]


def test_sigkill_mid_rollout_then_resume(tmp_path, broker, topics, events, keyring, trust):
    key = keyring.keys["release"]
    v1 = padded_bundle(tmp_path, key, version="1.0.0", scale=1.0)
    v2 = padded_bundle(tmp_path, key, version="2.0.0", scale=2.0, pad=40_000)
    devices = [start_device(tmp_path, trust.directory, broker.url, device=f"cam-{i:02d}", prefix=topics.prefix,
                            labels={"group": "cams"}, preinstall=v1) for i in range(10)]  # fmt: skip
    journal_path = tmp_path / "fleet.sqlite"
    common = ["--key", str(keyring.private("release")), "--broker", broker.url, "--journal", str(journal_path),
              "--protocol", "5", "--json"]  # fmt: skip
    try:
        for d in devices:
            events.wait_for_state(d.link.device_id, lambda s: s.online)
        operator = subprocess.Popen(
            _cli("fleet", "rollout", str(v2), "--group", "cams", "--waves", "2,50%,100%", "--soak", "1s",
                 "--chunk-size", "16k", "--id", "r1", "--prefix", topics.prefix, *common),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        succeeded: set[str] = set()
        refused = None
        assert operator.stdout is not None
        for line in operator.stdout:
            record = json.loads(line)
            if record["kind"] == "device" and record["state"] == "succeeded":
                succeeded.add(record["device"])
            if refused is None and record["kind"] == "device":
                # a second operator on the same journal is refused, naming the first
                refused = subprocess.run(
                    _cli("fleet", "rollout", str(v2), "--group", "cams", "--prefix", topics.prefix, *common),
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
            if len(succeeded) >= 3:
                break
        operator.send_signal(signal.SIGKILL)
        operator.wait(10)
        assert refused is not None and refused.returncode == 1
        message = " ".join(refused.stderr.split())
        assert "in use by operator pid" in message and f"pid {operator.pid} " in message
        mid = {e.device: e.state for e in Journal(journal_path).executions("r1")}
        assert Journal(journal_path).rollout("r1").status == "running"
        assert 3 <= sum(s == "succeeded" for s in mid.values()) < 10, mid

        status = subprocess.run(_cli("fleet", "status", "r1", "--journal", str(journal_path), "--json"),
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert status.returncode == 0 and json.loads(status.stdout)["status"] == "running"

        resumed = subprocess.run(_cli("fleet", "resume", "r1", *common), capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        journal = Journal(journal_path)
        assert journal.rollout("r1").status == "completed"
        rows = journal.executions("r1")
        assert {e.state for e in rows} == {"succeeded"} and len(rows) == 10
        assert all(e.attempts == 1 for e in rows)  # nobody was sent a second command
        assert all(d.serving() == "2.0.0" for d in devices)
        # the devices' own account: one install command accepted and one commit each
        accepted, committed = defaultdict(set), defaultdict(int)
        for event in events.events:
            if event.kind == "accepted" and event.action == "install":
                accepted[event.device].add(event.command_id)
            if event.kind == "result" and event.outcome == "committed" and event.version == "2.0.0":
                committed[event.device] += 1
        assert {d: len(c) for d, c in accepted.items()} == {f"cam-{i:02d}": 1 for i in range(10)}
        assert all(n == 1 for n in committed.values())
    finally:
        for d in devices:
            d.stop()


def test_pause_and_resume_requests(tmp_path, broker, topics, keyring, trust):
    key = keyring.keys["release"]
    v2 = padded_bundle(tmp_path, key, version="2.0.0", scale=2.0)
    devices = [start_device(tmp_path, trust.directory, broker.url, device=f"cam-{i}", prefix=topics.prefix,
                            labels={"group": "cams"}) for i in range(3)]  # fmt: skip
    journal_path = tmp_path / "fleet.sqlite"
    env = {**os.environ, "EDGEPACK_FLEET_JOURNAL": str(journal_path)}
    try:
        time.sleep(1.0)
        operator = subprocess.Popen(
            _cli("fleet", "rollout", str(v2), "--group", "cams", "--waves", "1,100%", "--soak", "2s", "--id", "r2",
                 "--prefix", topics.prefix, "--key", str(keyring.private("release")), "--broker", broker.url,
                 "--json"),
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert operator.stdout is not None
        for line in operator.stdout:
            if json.loads(line).get("state") == "soaking":
                break
        paused = subprocess.run(_cli("fleet", "pause", "r2", "--json"), capture_output=True, text=True, env=env,
                                timeout=60)  # fmt: skip
        assert paused.returncode == 0 and json.loads(paused.stdout)["operator"].startswith("pid")
        deadline = time.monotonic() + 30
        while Journal(journal_path).rollout("r2").status != "paused" and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3)  # the canary's soak ends; a paused rollout starts no new wave
        states = [e.state for e in Journal(journal_path).executions("r2")]
        assert states.count("succeeded") == 1 and states.count("queued") == 2
        subprocess.run(_cli("fleet", "resume", "r2", "--key", str(keyring.private("release")), "--broker",
                            broker.url), env=env, check=True, timeout=60)  # fmt: skip
        assert operator.wait(60) == 0
        assert {e.state for e in Journal(journal_path).executions("r2")} == {"succeeded"}
    finally:
        for d in devices:
            d.stop()
