"""The device registry from retained states, selectors, ``fleet forget``, deploy --wait's offline grace, and a
manual ``fleet rollback`` over MQTT."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from edgepack.errors import ConfigError
from edgepack.fleet.deploy import deploy
from edgepack.fleet.journal import Journal
from edgepack.fleet.plan import AbortRule, parse_duration, parse_rate, parse_waves
from edgepack.fleet.registry import forget_devices, health_problem, list_devices
from edgepack.fleet.rollback import rollback
from edgepack.fleet.selectors import Selector
from tests.fleet.agents import start_device
from tests.mqtt.helpers import options, padded_bundle


def test_selectors():
    lyon_orin = Selector.parse("site=lyon,class=jetson-orin")
    assert lyon_orin.matches("a", {"site": "lyon", "class": "jetson-orin"}, [])
    assert not lyon_orin.matches("a", {"site": "lyon", "class": "rpi4"}, [])
    ids = Selector.parse("cam-1,cam-2")
    assert ids.matches("cam-1", {}, []) and not ids.matches("cam-3", {}, [])
    assert Selector.parse("cams").matches("x", {"group": "cams,edge"}, ["cams", "edge", "group=cams,edge"])
    assert Selector.parse("group=edge").matches("x", {"group": "cams,edge"}, ["cams", "edge"])
    assert Selector.parse("site=lyon,cam-1").matches("cam-1", {"site": "lyon"}, [])
    assert not Selector.parse("site=lyon,cam-1").matches("cam-2", {"site": "lyon"}, [])
    assert Selector.parse("all").matches("z", {}, [])
    for bad in ("", "site=", "a b"):
        with pytest.raises(ConfigError):
            Selector.parse(bad)


def test_plan_parsing():
    waves = parse_waves("1,10%,50%")
    assert [w.size(200) for w in waves] == [1, 20, 100, 200]  # 100% is always the last wave
    assert parse_waves("3,100%")[0].size(2) == 2
    assert parse_rate("50/min") == 50 and parse_rate("2/s") == 120
    assert parse_duration("10m", "x") == 600 and parse_duration("500ms", "x") == 0.5
    rule = AbortRule.parse("all:20%:5")
    assert rule.states() == ("failed", "rejected", "timed_out") and rule.min_executed == 5
    for bad in ("boom:1%:1", "failed:120%:1", "failed:10%"):
        with pytest.raises(ConfigError):
            AbortRule.parse(bad)
    assert health_problem({"ok": True}) is None and health_problem({"alarms": ["selftest"]})


@pytest.mark.mqtt
def test_devices_forget_and_group_wait(tmp_path, broker, topics, events, keyring, trust):
    key = keyring.keys["release"]
    v1 = padded_bundle(tmp_path, key, version="1.0.0", scale=1.0)
    v2 = padded_bundle(tmp_path, key, version="2.0.0", scale=2.0)
    lyon = [start_device(tmp_path, trust.directory, broker.url, device=f"cam-{i}", prefix=topics.prefix,
                         labels={"site": "lyon", "class": "jetson-orin"}, preinstall=v1) for i in range(2)]  # fmt: skip
    retired = start_device(tmp_path, trust.directory, broker.url, device="old-1", prefix=topics.prefix,
                           labels={"site": "lyon", "class": "jetson-orin"})  # fmt: skip
    try:
        for name in ("cam-0", "cam-1", "old-1"):
            events.wait_for_state(name, lambda s: s.online)
        retired.stop()
        events.wait_for_state("old-1", lambda s: not s.online)
        found = {r.device: r for r in list_devices(options(broker.url, "5"), prefix=topics.prefix,
                                                    selector=Selector.parse("site=lyon,class=jetson-orin"))}
        assert set(found) == {"cam-0", "cam-1", "old-1"}
        assert found["cam-0"].online and not found["old-1"].online
        assert found["cam-0"].models["linear"]["active"] == "1.0.0" and found["cam-0"].agent_version
        # the CLI prints the same as JSON
        out = subprocess.run([sys.executable, "-m", "edgepack", "fleet", "devices", "--group", "cam-1", "--broker",
                              broker.url, "--prefix", topics.prefix, "--json"], capture_output=True, text=True,
                             timeout=60, check=True)  # fmt: skip
        assert [d["device"] for d in json.loads(out.stdout)] == ["cam-1"]

        # deploy --wait to the group does not wait out the timeout on the offline member
        started = time.monotonic()
        report = deploy(v2, options=options(broker.url, "5"), keys=[key], group="site=lyon", prefix=topics.prefix,
                        wait=True, timeout=120, offline_grace=1.0)  # fmt: skip
        assert time.monotonic() - started < 60
        assert {d: p.outcome for d, p in report.devices.items()} == {"cam-0": "committed", "cam-1": "committed",
                                                                     "old-1": "offline"}  # fmt: skip
        # forgotten, it is not listed, and not a member any more
        assert forget_devices(["old-1"], options(broker.url, "5"), prefix=topics.prefix) == {"old-1": True}
        assert "old-1" not in {r.device for r in list_devices(options(broker.url, "5"), prefix=topics.prefix)}

        # --to a version the devices do not hold: refused, saying what they hold; nothing sent
        journal = Journal(tmp_path / "fleet.sqlite")
        refused = rollback(options(broker.url, "5"), selector=Selector.parse("site=lyon"), model="linear",
                           keys=[key], to_version="0.9.0", prefix=topics.prefix, timeout=10, journal=journal)  # fmt: skip
        assert [o.outcome for o in refused] == ["refused", "refused"]
        assert "does not hold linear 0.9.0 (it keeps active 2.0.0, previous 1.0.0)" in (refused[0].reason or "")
        assert all(d.serving() == "2.0.0" for d in lyon)
        # a manual rollback over MQTT, journaled: each device back to the version it keeps
        outcomes = rollback(options(broker.url, "5"), selector=Selector.parse("site=lyon"), model="linear",
                            keys=[key], to_version="1.0.0", prefix=topics.prefix, timeout=60, journal=journal,
                            rollback_id="back-1")  # fmt: skip
        assert [(o.device, o.outcome, o.from_version, o.to_version) for o in outcomes] == [
            ("cam-0", "committed", "2.0.0", "1.0.0"), ("cam-1", "committed", "2.0.0", "1.0.0")]  # fmt: skip
        assert all(d.serving() == "1.0.0" for d in lyon)
        row = journal.rollout("back-1")
        assert (row.kind, row.status, journal.counts("back-1")) == ("rollback", "completed", {"rolled_back": 2})
        sent = [h for h in journal.history("back-1") if h["state"] == "rolling_back"]
        assert len(sent) == 2 and all(h["command_id"] for h in sent)  # the commands were journaled first
        status = subprocess.run([sys.executable, "-m", "edgepack", "fleet", "status", "back-1", "--journal",
                                 str(journal.path), "--json"], capture_output=True, text=True, timeout=60,
                                check=True)  # fmt: skip
        assert json.loads(status.stdout)["kind"] == "rollback"
        # after a rollback the agent keeps no previous version: a second one has nothing to go to, said so
        again = rollback(options(broker.url, "5"), selector=Selector.parse("cam-0"), model="linear", keys=[key],
                         prefix=topics.prefix, timeout=10, journal=journal)  # fmt: skip
        assert again[0].outcome == "skipped" and "already rolled back (runs 1.0.0, below its highest 2.0.0)" in (
            again[0].reason or "")  # fmt: skip
        cli = subprocess.run([sys.executable, "-m", "edgepack", "fleet", "rollback", "--group", "cam-0", "--model",
                              "linear", "--to", "2.0.0", "--key", str(keyring.private("release")), "--broker",
                              broker.url, "--prefix", topics.prefix, "--journal", str(journal.path), "--json"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert cli.returncode == 1, cli.stderr
        assert [(o["outcome"], "does not hold linear 2.0.0" in o["reason"]) for o in json.loads(cli.stdout)] == [
            ("refused", True)]  # fmt: skip
    finally:
        for d in lyon:
            d.stop()
