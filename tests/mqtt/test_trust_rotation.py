"""Trust over a real mosquitto: a rotated root pushed to a group (``fleet trust push``) reaches every member,
shows in its state, and from then on the revoked release key's bundles and commands are refused fleet-wide;
a forged root is refused; an expired root keeps serving and accepts nothing new; commands replayed or
reordered across a device restart are refused."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from edgepack.fleet.deploy import Deployer, DeployObserver, deploy
from edgepack.fleet.journal import Journal
from edgepack.fleet.trust_push import push_trust
from edgepack.keys import SigningKey
from edgepack.manifest import utc_now
from edgepack.mqtt import MqttClient
from edgepack.protocol import CommandTarget, encode, trust_update
from edgepack.transfer import chunk_bundle
from edgepack.trust import TrustStore
from edgepack.trust_root import build_root, create, rotate, sign_root
from tests.models import linear_reference
from tests.mqtt.helpers import EventLog, install_command, options, padded_bundle, signed, start_agent

pytestmark = pytest.mark.mqtt

X = np.random.default_rng(11).standard_normal((2, 4)).astype(np.float32)
PROTOCOL = "5"


@pytest.fixture
def root_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def operator(tmp_path: Path, keyring, root_key) -> TrustStore:
    """The operator's store: an offline root key; 'release' signs bundles and commands."""
    release = [(keyring.keys["release"].public, "release")]
    spec = {"root": [(root_key.public, "root")], "bundle": release, "command": release}
    return create(tmp_path / "operator-trust", spec, signers=[root_key])


@pytest.fixture
def log(broker, topics):
    events = EventLog(broker.url, PROTOCOL, topics).start()
    yield events
    events.stop()


def device_trust(tmp_path: Path, operator: TrustStore, device: str) -> Path:
    """Each device ships its own copy of version 1 (the firmware image's /etc/edgepack/trust)."""
    return Path(shutil.copytree(operator.directory, tmp_path / f"trust-{device}"))


def send(broker, topic: str, payload: bytes) -> None:
    client = MqttClient(options(broker.url, PROTOCOL, "raw"))
    client.connect(10)
    try:
        client.wait_published([client.publish(topic, payload, retain=True)], 10)
    finally:
        client.stop()


def test_rotation_revokes_a_release_key_fleet_wide(tmp_path, broker, topics, log, keyring, operator, root_key):
    names = ("cam-1", "cam-2")
    agents = {n: start_agent(tmp_path, device_trust(tmp_path, operator, n), broker.url, device=n,
                             prefix=topics.prefix, protocol=PROTOCOL, labels={"group": "cams"}) for n in names}  # fmt: skip
    release, second = keyring.keys["release"], keyring.keys["second"]
    opts = options(broker.url, PROTOCOL)
    try:
        for a in agents.values():
            assert a.link.client.wait_connected(10)
        v1 = padded_bundle(tmp_path / "v1", release, version="1.0.0", scale=2.0)
        assert deploy(v1, options=opts, keys=[release], group="cams", prefix=topics.prefix, wait=True, timeout=30,
                      chunk_size=1024).ok  # fmt: skip
        for n in names:
            assert log.wait_for_state(n, lambda s: s.trust is not None and s.trust.version == 1)

        # the release key is stolen: root version 2 revokes it and names 'second' instead; no re-flash
        rotate(operator, [root_key], revoke=[release.key_id],
               add={"bundle": [(second.public, "second")], "command": [(second.public, "second")]})  # fmt: skip
        push_trust(opts, operator, ["cams"], prefix=topics.prefix)
        for n in names:
            state = log.wait_for_state(n, lambda s: s.trust is not None and s.trust.version == 2)
            assert not state.trust.expired
            assert TrustStore.load(tmp_path / f"trust-{n}").revoked == {release.key_id}  # on disk, atomically

        # a command signed by the stolen key: refused by every device before anything is fetched
        stolen = padded_bundle(tmp_path / "v2", release, version="2.0.0", scale=5.0)
        report = deploy(stolen, options=opts, keys=[release], group="cams", prefix=topics.prefix, wait=True,
                        timeout=30, chunk_size=1024)  # fmt: skip
        assert {d: (p.outcome, p.code) for d, p in report.devices.items()} == {
            n: ("rejected", "untrusted") for n in names
        }, report.devices
        # a valid command for a bundle signed only by the stolen key: the bundle is refused, v1 stays live
        report = deploy(stolen, options=opts, keys=[second], group="cams", prefix=topics.prefix, wait=True,
                        timeout=30, chunk_size=1024)  # fmt: skip
        for n in names:
            assert report.devices[n].outcome in ("failed", "rolled_back"), report.devices[n]
            assert report.devices[n].code == "untrusted", report.devices[n]
            np.testing.assert_allclose(agents[n].infer(X), linear_reference(X, 2.0), rtol=1e-5)
        # what the new key signs goes through
        good = padded_bundle(tmp_path / "v3", second, version="3.0.0", scale=3.0)
        assert deploy(good, options=opts, keys=[second], group="cams", prefix=topics.prefix, wait=True, timeout=30,
                      chunk_size=1024).ok  # fmt: skip
        for n in names:
            np.testing.assert_allclose(agents[n].infer(X), linear_reference(X, 3.0), rtol=1e-5)
    finally:
        for a in agents.values():
            a.stop()


def test_forged_trust_messages_are_refused(tmp_path, broker, topics, log, keyring, operator, root_key):
    agent = start_agent(tmp_path, device_trust(tmp_path, operator, "cam-9"), broker.url, device="cam-9",
                        prefix=topics.prefix, protocol=PROTOCOL, labels={"group": "cams"})  # fmt: skip
    evil = SigningKey.generate()
    try:
        assert agent.link.client.wait_connected(10)
        spec = {"root": [(evil.public, "evil")], "bundle": [(evil.public, "evil")], "command": [(evil.public, "evil")]}
        forged = sign_root(build_root(spec, {}, version=2, expires=utc_now() + timedelta(days=9)), [evil])
        send(broker, topics.group_trust("cams"), encode(trust_update([forged.to_bytes()])))
        rejected = log.wait_for(lambda e: e.kind == "rejected" and e.topic == topics.group_trust("cams"),
                                what="the forged root refused")  # fmt: skip
        assert rejected.code == "trust_update" and "valid signatures by the root keys of version 1" in rejected.reason
        rotate(operator, [root_key])
        rotate(operator, [root_key])
        skipped = encode(trust_update(operator.chain(3)))  # version 3 alone to a device at 1
        send(broker, topics.group_trust("cams"), skipped)
        log.wait_for(lambda e: e.kind == "rejected" and "skipped-ahead" in e.reason, what="the skipped version")
        assert agent.agent.trust.version == 1
        push_trust(options(broker.url, PROTOCOL), operator, ["cams"], prefix=topics.prefix)  # the whole chain
        assert log.wait_for_state("cam-9", lambda s: s.trust is not None and s.trust.version == 3)
    finally:
        agent.stop()


def test_expired_root_serves_but_installs_nothing_new(tmp_path, broker, topics, log, keyring, operator, root_key,
                                                      monkeypatch):  # fmt: skip
    trust_dir = device_trust(tmp_path, operator, "cam-5")
    cams = {"group": "cams"}
    agent = start_agent(tmp_path, trust_dir, broker.url, device="cam-5", prefix=topics.prefix, protocol=PROTOCOL,
                        labels=cams)  # fmt: skip
    release = keyring.keys["release"]
    opts = options(broker.url, PROTOCOL)
    try:
        assert agent.link.client.wait_connected(10)
        v1 = padded_bundle(tmp_path / "v1", release, version="1.0.0", scale=2.0)
        assert deploy(v1, options=opts, keys=[release], device="cam-5", prefix=topics.prefix, wait=True,
                      timeout=30).ok  # fmt: skip
    finally:
        agent.stop()
    # a year and a bit later the root (365 days) has expired; the device restarts and keeps serving
    later = utc_now() + timedelta(days=400)
    monkeypatch.setattr("edgepack.trust.utc_now", lambda: later)
    agent = start_agent(tmp_path, trust_dir, broker.url, device="cam-5", prefix=topics.prefix, protocol=PROTOCOL,
                        labels=cams)  # fmt: skip
    try:
        assert agent.link.client.wait_connected(10)
        np.testing.assert_allclose(agent.infer(X), linear_reference(X, 2.0), rtol=1e-5)
        state = log.wait_for_state("cam-5", lambda s: s.trust is not None and s.trust.expired)
        assert any("accepting nothing new" in n for n in state.notices)
        v2 = padded_bundle(tmp_path / "v2", release, version="2.0.0", scale=4.0)
        report = deploy(v2, options=opts, keys=[release], device="cam-5", prefix=topics.prefix, wait=True, timeout=30)
        assert (report.devices["cam-5"].outcome, report.devices["cam-5"].code) == ("rejected", "trust_expired")
        np.testing.assert_allclose(agent.infer(X), linear_reference(X, 2.0), rtol=1e-5)
        # a fresh root (signed by the offline root key) is still accepted, and then installs work again
        monkeypatch.setattr("edgepack.trust_root.utc_now", lambda: later)
        rotate(operator, [root_key])
        push_trust(opts, operator, ["cams"], prefix=topics.prefix)
        assert log.wait_for_state(
            "cam-5", lambda s: s.trust is not None and s.trust.version == 2 and not s.trust.expired
        )
        v3 = padded_bundle(tmp_path / "v3", release, version="3.0.0", scale=4.0)
        assert deploy(v3, options=opts, keys=[release], device="cam-5", prefix=topics.prefix, wait=True,
                      timeout=30).ok  # fmt: skip
    finally:
        agent.stop()


def test_replayed_and_reordered_commands_refused_across_a_restart(tmp_path, broker, topics, log, keyring, trust):
    release = keyring.keys["release"]
    journal = Journal(tmp_path / "fleet.sqlite")  # the operators' counter orders the commands
    to = CommandTarget(device="cam-3")
    v1 = chunk_bundle(padded_bundle(tmp_path / "v1", release, version="1.0.0", scale=2.0), 1024)
    v2 = chunk_bundle(padded_bundle(tmp_path / "v2", release, version="2.0.0", scale=3.0), 1024)
    first = signed(install_command(v1, to, seq=journal.next_command_seq()), release)  # issued first ...
    later = signed(install_command(v2, to, seq=journal.next_command_seq()), release)  # ... then this one
    agent = start_agent(tmp_path, trust.directory, broker.url, device="cam-3", prefix=topics.prefix, protocol=PROTOCOL)
    try:
        assert agent.link.client.wait_connected(10)
        with Deployer(options(broker.url, PROTOCOL), topics, DeployObserver()) as deployer:
            deployer.publish_bundle(v2)
            deployer.publish_bundle(v1)
            deployer.send(later)
            done = log.wait_for(lambda e: e.kind == "result" and e.command_id == later.command.id, timeout=30)
            assert done.outcome == "committed", done
    finally:
        agent.stop()
    agent = start_agent(tmp_path, trust.directory, broker.url, device="cam-3", prefix=topics.prefix, protocol=PROTOCOL)
    try:
        assert agent.link.client.wait_connected(10)
        # reordered: the command issued before the one the device ran arrives after the device restarted
        send(broker, topics.device_command("cam-3"), encode(first))
        stale = log.wait_for(lambda e: e.kind == "rejected" and e.command_id == first.command.id, what="stale")
        assert stale.code == "stale" and f"sequence {first.command.seq}" in stale.reason
        # replayed: the exact command the device ran, sent again live (not retained)
        client = MqttClient(options(broker.url, PROTOCOL, "replay"))
        client.connect(10)
        try:
            client.wait_published([client.publish(topics.device_command("cam-3"), encode(later))], 10)
        finally:
            client.stop()
        log.wait_for(lambda e: e.kind == "rejected" and e.command_id == later.command.id and e.code == "replayed",
                     what="the replay refused")  # fmt: skip
        assert agent.serving() == "2.0.0"
        np.testing.assert_allclose(agent.infer(X), linear_reference(X, 3.0), rtol=1e-5)
    finally:
        agent.stop()
        journal.close()
