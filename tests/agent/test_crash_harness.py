"""A real agent process taking installs, swaps and rollbacks over a real mosquitto, SIGKILLed at ≥ 200 seeded
random points; after every restart it serves a model that verifies, its store is consistent, every journal
has an outcome and no acknowledged commit is lost (tests/harness/crash.py says how, and what is checked).

Knobs (environment): ``EDGEPACK_CRASH_KILLS`` (default 200), ``EDGEPACK_CRASH_SEED`` (default ``edgepack``),
``EDGEPACK_CRASH_SPAWN=1`` (start each agent cold instead of forking it from a warm server).
"""

from __future__ import annotations

import os
import time

import pytest

from tests.harness.crash import CrashHarness
from tests.mqtt.broker import Mosquitto, find_mosquitto

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

KILLS = int(os.environ.get("EDGEPACK_CRASH_KILLS", "200"))
SEED = os.environ.get("EDGEPACK_CRASH_SEED", "edgepack")


@pytest.fixture(scope="module")
def crash_broker(tmp_path_factory: pytest.TempPathFactory):
    binary = find_mosquitto()
    if binary is None:
        reason = "mosquitto is not installed (scripts/test installs it: apt-get install mosquitto)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    broker = Mosquitto(binary, tmp_path_factory.mktemp("crash-mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.mark.timeout(1800)
def test_agent_survives_sigkill_at_seeded_points(tmp_path, crash_broker, keyring, trust):
    started = time.monotonic()
    harness = CrashHarness(
        tmp_path, crash_broker.url, keyring.keys["release"], trust, seed=SEED,
        fork=os.environ.get("EDGEPACK_CRASH_SPAWN") != "1",
    )  # fmt: skip
    try:
        harness.bootstrap()
        number = 0
        while harness.total_kills < KILLS:
            harness.cycle(number)
            number += 1
            if len(harness.violations) > 20:
                break  # enough to go on; the report lists them
        harness.finish()
    finally:
        harness.close()
        print()
        print(harness.report())
        print(f"  {time.monotonic() - started:.0f} s in all; agent logs under {tmp_path / 'logs'}")
        for violation in harness.violations[:20]:
            print(f"  VIOLATION {violation}")
    assert harness.total_kills >= KILLS
    assert not harness.violations, "\n".join(str(v) for v in harness.violations[:20])


def test_the_harness_sees_a_broken_store(tmp_path, crash_broker, keyring, trust):
    """The checks can fail: a payload file of the active bundle altered on disk is reported (the agent then
    refuses to load it and serves nothing, while the store still names it active)."""
    harness = CrashHarness(tmp_path, crash_broker.url, keyring.keys["release"], trust, seed="self-check")
    try:
        harness.bootstrap()
        active = harness._store_state()["models"]["linear"]["active"]
        (harness.state_dir / "bundles" / active / "model.onnx").write_bytes(b"not the signed model")
        harness._point = "self-check"
        harness._start(None)
        assert harness._wait_ready()
        harness.check_serving()
        harness.check_store()
        harness._stop_clean()
    finally:
        harness.close()
    found = "\n".join(str(v) for v in harness.violations)
    print(found)
    assert "does not verify" in found
    assert "no model is served" in found or "the API serves" in found
