"""Disk full, for real: the agent's state directory on a small tmpfs made by the test, bundles over mosquitto.

1. A bundle that cannot fit (it needs its size twice: the transfer, then its extracted copy) is refused up
   front: a ``failed`` result with code ``quota``, and not one chunk asked for or written.
2. A bundle that fits when its transfer starts, but the disk fills while it downloads (the test writes a
   ballast file once the transfer is open, then lets the chunks through): the install fails clean — a
   result that says so, the live model untouched and serving, the journal finished, nothing left in
   ``incoming/``, ``tmp/`` or ``bundles/`` — and once the ballast is gone the space is all back: free
   space is what it was before, and a bundle of the same size installs.

Needs ``mount -t tmpfs`` (root with CAP_SYS_ADMIN, as in CI); skips with the reason where it is not allowed.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness.crash import CHUNK, CrashHarness
from tests.mqtt.broker import Mosquitto, find_mosquitto

pytestmark = pytest.mark.mqtt

TMPFS = 6 << 20
BIG = 4 << 20  # needs 8 MiB: refused up front on a 6 MiB disk
MID = 1536 << 10  # needs 3 MiB: fits when it starts


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def small_disk(tmp_path):
    mountpoint = tmp_path / "state"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS},mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs for the disk-full test ({done.stderr.strip() or done.returncode}); needs root"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.fixture
def disk_broker(tmp_path):
    binary = find_mosquitto()
    if binary is None:
        reason = "mosquitto is not installed (scripts/test installs it: apt-get install mosquitto)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    broker = Mosquitto(binary, tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout} s")


def _result(harness: CrashHarness, sent) -> object:
    return _wait(
        lambda: next((e for e in harness.watch.events(sent.command_id) if e.kind == "result"), None), 60, "result"
    )


def test_disk_full_refused_up_front_and_mid_transfer(tmp_path, small_disk, disk_broker, keyring, trust):
    harness = CrashHarness(tmp_path, disk_broker.url, keyring.keys["release"], trust, seed="disk", fork=False)
    assert harness.state_dir == small_disk
    try:
        harness.bootstrap()  # v1.0.0 committed over MQTT, then a clean stop
        harness._start(None)
        assert harness._wait_ready(), harness._log_tail()
        assert harness._wait_idle(harness.sent[-1])
        live_version = harness._active_version()
        assert live_version == "1.0.0"
        baseline = _free(small_disk)

        # 1. cannot fit: refused before the first chunk
        big = harness._new_version(good=True, pad=BIG)
        sent = harness._send_install(big)
        result = _result(harness, sent)
        phases = [getattr(e, "phase", None) for e in harness.watch.events(sent.command_id)]
        print(f"too big: {result.outcome} ({result.code}): {result.reason}; phases {phases}")
        assert result.outcome == "failed" and result.code == "quota", result
        assert "download" not in phases, "chunks were fetched for a bundle that cannot fit"
        assert result.transfer is None or result.transfer.received_bytes == 0
        harness.check_serving()
        assert harness._wait_idle(sent)
        harness.check_store()
        assert harness._active_version() == live_version

        # 2. fits at the start, the disk fills while it downloads: chunks held back until the ballast is down
        mid = harness._new_version(good=True, pad=MID, publish=False)
        chunked = harness.bundles[mid][0]
        client = harness.operator.client
        client.wait_published(
            [client.publish(harness.topics.index(chunked.bundle), chunked.index_bytes, retain=True)], 10
        )
        sent = harness._send_install(mid)
        _wait(
            lambda: (
                any(getattr(e, "phase", None) == "download" for e in harness.watch.events(sent.command_id))
                or (small_disk / "incoming" / chunked.bundle / "bundle.part").exists()
            ),
            30,
            "open transfer",
        )
        time.sleep(0.3)  # the partial file is preallocated when the transfer opens
        ballast = small_disk / "ballast"
        room = _free(small_disk) - 64 * 1024  # leave a little: journals and commands.json still need writing
        with open(ballast, "wb") as fh:
            fh.write(b"\0" * max(0, room))
        print(f"mid-way: ballast of {room / 2**20:.2f} MiB leaves {_free(small_disk) / 1024:.0f} KiB free")
        infos = [client.publish(harness.topics.chunk(ref.sha256), data, retain=True) for _, ref, data in
                 chunked.iter_chunks()]  # fmt: skip
        client.wait_published(infos, 30)
        result = _result(harness, sent)
        print(f"mid-way: {result.outcome} ({result.code}): {result.reason}")
        assert result.outcome in ("failed", "rolled_back"), result
        harness.check_serving()  # the live model is untouched and serving
        assert harness._active_version() == live_version
        assert harness._wait_idle(sent)
        ballast.unlink()
        harness.check_store()  # nothing left: incoming/, tmp/, bundles/ hold only what state.json names
        after = _free(small_disk)
        print(f"free before {baseline / 1024:.0f} KiB, after {after / 1024:.0f} KiB")
        assert after >= baseline - 128 * 1024, f"space did not come back: {baseline - after} bytes short"

        # 3. and the space is usable: a bundle of the same size installs now
        again = harness._new_version(good=True, pad=MID)
        sent = harness._send_install(again)
        result = _result(harness, sent)
        assert result.outcome == "committed", result
        harness.check_serving()
        assert harness._active_version() == again
        assert harness._wait_idle(sent)
        harness.check_store()
        harness._stop_clean()
    finally:
        harness.close()
        for violation in harness.violations:
            print(f"VIOLATION {violation}")
    assert not harness.violations, "\n".join(str(v) for v in harness.violations)
    assert CHUNK  # the harness's chunking is what the sizes above assume
