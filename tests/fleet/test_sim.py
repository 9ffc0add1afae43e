"""A 200-device simulated rollout (fleet/sim.py: the real agent and link code, a stand-in runtime) with
injected faults, over a real mosquitto: the rollout ends with exactly the counts the faults predict."""

from __future__ import annotations

import pytest

from edgepack.fleet.engine import RolloutEngine, create_rollout
from edgepack.fleet.journal import Journal
from edgepack.fleet.plan import RolloutPlan, parse_waves
from edgepack.fleet.sim import SimSpec, Simulator, make_bundle
from tests.mqtt.helpers import options

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]


def test_200_simulated_devices_with_faults(tmp_path, broker, topics, keyring, trust):
    spec = SimSpec(
        broker=broker.url, trust=trust.directory, root=tmp_path / "sim", devices=200, prefix=topics.prefix,
        processes=4, faults={"selftest": 0.05, "offline": 0.03, "vanish": 0.02, "slow": 0.03, "mute": 0.02},
        slow_rate=16 * 1024, offline_s=2.0,
    )  # fmt: skip
    predicted = spec.predicted()
    assert predicted == {"succeeded": 182, "failed": 10, "timed_out": 8}
    bundle = make_bundle(tmp_path / "sim-2.0.0.epk", keyring.keys["release"], version="2.0.0", size=60_000)
    with Simulator(spec):
        plan = RolloutPlan(waves=parse_waves("5%,100%"), success_gate=50, device_timeout_s=25,
                           chunk_size=4096, offline_wait_s=5)  # fmt: skip
        journal = Journal(tmp_path / "fleet.sqlite")
        rid = create_rollout(journal, bundle, selector="group=sim", plan=plan, prefix=topics.prefix)
        rollout = RolloutEngine(journal, rid, options=options(broker.url, "5"), keys=[keyring.keys["release"]]).run()
    assert rollout.status == "completed", rollout.reason
    rows = journal.executions(rid)
    counts = journal.counts(rid)
    faults = spec.fault_of()
    wrong = [(e.device, faults.get(int(e.device.split("-")[1])), e.state, e.reason) for e in rows
             if e.state != {"selftest": "failed", "vanish": "timed_out", "mute": "timed_out"}.get(
                 faults.get(int(e.device.split("-")[1]), ""), "succeeded")]  # fmt: skip
    assert not wrong, wrong[:10]
    assert counts == predicted
    assert all(e.code == "selftest" for e in rows if e.state == "failed")
    assert all(e.attempts == 1 for e in rows)
