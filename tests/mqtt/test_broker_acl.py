"""The generated broker access rules, enforced by a real mosquitto: `edgepack fleet broker-config mosquitto` with
certificates from `edgepack fleet ca init` / `fleet provision`, on a TLS listener on 127.0.0.1.

What is shown is what a compromised device (cam-a, holding its own key and certificate) can and cannot do:
it reads only its own and its provisioned groups' commands, writes only its own state and events, publishes
no command, chunk or index; an operator's certificate can; a real agent installs over the listener; and a
state or event that names another device than its topic is not taken by the operator.

"Nothing is delivered" is observed, not assumed: every forged publish is followed by a legitimate one from the
same client (or after a PUBACK), and the observer must see the legitimate one and not the forged one.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from edgepack.errors import BrokerConnectionError
from edgepack.fleet.broker_config import BrokerFiles, write_mosquitto
from edgepack.fleet.ca import FleetCA
from edgepack.fleet.deploy import Deployer, deploy
from edgepack.fleet.provision import provision_device, provision_operator
from edgepack.mqtt import MqttClient, MqttOptions, Received
from edgepack.protocol import DeviceState, ResultEvent, Topics, encode
from edgepack.trust import TrustStore
from tests.models import linear_reference
from tests.mqtt.broker import Mosquitto, find_mosquitto, free_port
from tests.mqtt.helpers import padded_bundle, start_agent

pytestmark = pytest.mark.mqtt

PREFIX = f"acl{uuid.uuid4().hex[:8]}"
TOPICS = Topics(PREFIX)
X = np.random.default_rng(7).standard_normal((2, 4)).astype(np.float32)
PROBE = "00" * 32  # a retained chunk every device may read: its arrival shows the subscriptions are active
QUIET_S = 0.5  # after the control message arrived, how long we keep watching for a forged one


@dataclass
class Identity:
    ca: Path
    cert: Path
    key: Path


@dataclass
class FleetBroker:
    broker: Mosquitto
    ca: FleetCA
    ids: dict[str, Identity]
    operator_port: int
    rewrite: Callable[[], BrokerFiles]  # broker-config again, with the same settings

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker.port}"

    @property
    def operator_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.operator_port}"

    def options(self, who: str, protocol: str, client_id: str | None = None, url: str | None = None) -> MqttOptions:
        """Options for ``who``: devices on the device listener, operators on the operator listener."""
        ident = self.ids[who]
        return MqttOptions(
            url=url or (self.operator_url if who.startswith("ops") else self.url),
            client_id=client_id or f"{who}-{uuid.uuid4().hex[:6]}", protocol=protocol,
            ca=ident.ca, cert=ident.cert, key=ident.key,
        )  # fmt: skip


@dataclass
class Watcher:
    """A connected client that records what it receives."""

    client: MqttClient
    got: list[Received] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)  # why the broker connection was lost, each time
    cv: threading.Condition = field(default_factory=threading.Condition)

    def on_message(self, message: Received) -> None:
        with self.cv:
            self.got.append(message)
            self.cv.notify_all()

    def wait_for(self, predicate: Callable[[Received], bool], timeout: float = 10.0) -> Received:
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for message in self.got:
                    if predicate(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"nothing matching within {timeout} s; got {[m.topic for m in self.got]}")
                self.cv.wait(left)

    def topics(self) -> set[str]:
        with self.cv:
            return {m.topic for m in self.got}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetBroker]:
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed (scripts/test installs it: apt-get install mosquitto)")
    root = tmp_path_factory.mktemp("fleet")
    ca = FleetCA.init(root / "ca")
    ids: dict[str, Identity] = {}
    for device, group in (("cam-a", "cams"), ("cam-b", "gates"), ("cam-c", "cams")):
        p = provision_device(ca, device, root / device, labels={"group": group})
        ids[device] = Identity(p.ca, p.cert, p.key)
    p = provision_operator(ca, "ops", root / "ops")
    ids["ops"] = Identity(p.ca, p.cert, p.key)
    port, operator_port = free_port(), free_port()

    def rewrite() -> BrokerFiles:
        return write_mosquitto(
            ca, root / "broker", hosts=["127.0.0.1"], port=port, operator_port=operator_port, bind="127.0.0.1",
            prefix=PREFIX,
        )  # fmt: skip

    files = rewrite()
    broker = Mosquitto(
        binary, root / "mosquitto", port=port, base_config=tuple(files.conf.read_text().splitlines()),
        extra_config=("log_type all",),  # the log says which ACL check refused what
    )  # fmt: skip
    broker.start()
    fleet = FleetBroker(broker, ca, ids, operator_port, rewrite)
    op = MqttClient(fleet.options("ops", "5"))
    op.connect(10)
    _publish(op, TOPICS.chunk(PROBE), b"probe", retain=True)  # what _watch waits for
    op.stop()
    yield fleet
    broker.stop()


def _watch(fleet: FleetBroker, who: str, protocol: str, topics: list[str], client_id: str | None = None) -> Watcher:
    """A connected client of ``who``, subscribed to ``topics`` — for sure: it returns once a message sent after
    the subscriptions arrived (an operator's own sync marker; for a device the retained probe chunk)."""
    options = fleet.options(who, protocol, client_id)
    watcher = Watcher(MqttClient(options))
    watcher.client.set_handlers(on_message=watcher.on_message, on_disconnect=watcher.drops.append)
    operator = who.startswith("ops")
    probe = TOPICS.operator_sync(options.client_id) if operator else TOPICS.chunk(PROBE)
    watcher.client.subscribe([*topics, probe])
    watcher.client.connect(10)
    if operator:
        _publish(watcher.client, probe, b"marker")
    watcher.wait_for(lambda m: m.topic == probe)
    return watcher


def _publish(client: MqttClient, topic: str, payload: bytes, *, retain: bool = False) -> None:
    client.wait_published([client.publish(topic, payload, retain=retain)], 10)


def test_only_fleet_certificates_connect(fleet, tmp_path):
    nobody = MqttClient(MqttOptions(url=fleet.url, client_id="nobody", ca=fleet.ids["ops"].ca, protocol="5"))
    with pytest.raises(BrokerConnectionError):
        nobody.connect(1)  # no client certificate
    nobody.stop()
    stranger = FleetCA.init(tmp_path / "other-ca")  # certificates with known CNs from another CA
    forged = [provision_device(stranger, "cam-a", tmp_path / "d"), provision_operator(stranger, "ops", tmp_path / "o")]
    attempts = [
        (fleet.url, forged[0].cert, forged[0].key),
        (fleet.operator_url, forged[1].cert, forged[1].key),
        (fleet.operator_url, fleet.ids["cam-a"].cert, fleet.ids["cam-a"].key),  # a device on the operator listener
    ]
    for url, cert, key in attempts:
        client = MqttClient(
            MqttOptions(url=url, client_id="cam-a", ca=fleet.ids["ops"].ca, cert=cert, key=key, protocol="5")
        )
        with pytest.raises(BrokerConnectionError):
            client.connect(1)
        client.stop()


def test_device_cannot_take_over_another_devices_connection(fleet, protocol):
    b = _watch(fleet, "cam-b", protocol, [], client_id="cam-b")
    a = _watch(fleet, "cam-a", protocol, [], client_id="cam-b")  # the broker makes it "cam-a" (its CN)
    try:
        time.sleep(1.0)
        assert not b.drops and not a.drops  # without use_username_as_clientid, each knocks the other off
        assert b.client.is_connected and a.client.is_connected
        a.client.wait_published([a.client.publish(TOPICS.events("cam-a"), b"still here")], 5)  # still cam-a's rights
    finally:
        a.client.stop()
        b.client.stop()


def test_device_reads_only_its_own_and_its_groups_commands(fleet, protocol):
    mine = [TOPICS.device_command("cam-a"), TOPICS.group_command("cams"), TOPICS.group_trust("cams")]
    theirs = [TOPICS.device_command("cam-b"), TOPICS.group_command("gates"), TOPICS.group_trust("gates")]
    op = _watch(fleet, "ops", protocol, [])
    # cam-a asks for everything: other devices' and groups' commands and trust updates, wildcards, the whole tree
    a = _watch(
        fleet, "cam-a", protocol, [*mine, *theirs, f"{PREFIX}/devices/+/cmd", f"{PREFIX}/groups/#", f"{PREFIX}/#"]
    )
    try:
        tag = uuid.uuid4().hex.encode()
        for topic in theirs + mine:
            _publish(op.client, topic, b"cmd " + tag + topic.encode())
        for topic in mine:
            a.wait_for(lambda m, topic=topic: m.topic == topic and tag in m.payload)
        time.sleep(QUIET_S)
        got = a.topics()
        assert set(theirs).isdisjoint(got), got
        assert all(t in mine or TOPICS.parse(t).kind in ("chunk", "index") for t in got), got  # type: ignore[union-attr]
    finally:
        a.client.stop()
        op.client.stop()


def test_device_cannot_write_into_another_device_or_publish_commands_chunks(fleet, protocol):
    sha = "ab" * 32
    op = _watch(fleet, "ops", protocol, [TOPICS.all_states, TOPICS.all_events])
    b = _watch(fleet, "cam-b", protocol, [
        TOPICS.device_command("cam-b"), TOPICS.group_command("gates"), TOPICS.chunk(sha), TOPICS.index("cd" * 32),
    ])  # fmt: skip
    a = _watch(fleet, "cam-a", protocol, [])
    try:
        tag = uuid.uuid4().hex.encode()
        forged = [
            TOPICS.state("cam-b"),
            TOPICS.events("cam-b"),  # into B's reports
            TOPICS.device_command("cam-b"),
            TOPICS.group_command("gates"),
            TOPICS.device_command("cam-a"),  # commands
            TOPICS.chunk(sha),
            TOPICS.index("cd" * 32),  # transfer pieces
        ]
        for topic in forged:
            _publish(a.client, topic, b"forged " + tag, retain=True)
        # controls: the same client's own event (in order after the forged ones), the operator's command to B
        _publish(a.client, TOPICS.events("cam-a"), b"control " + tag)
        _publish(op.client, TOPICS.device_command("cam-b"), b"control " + tag)
        op.wait_for(lambda m: m.topic == TOPICS.events("cam-a") and b"control" in m.payload)
        b.wait_for(lambda m: m.topic == TOPICS.device_command("cam-b") and b"control" in m.payload)
        time.sleep(QUIET_S)
        assert not [m for m in op.got + b.got if b"forged" in m.payload]
        # nothing forged was retained either: a fresh subscriber with operator rights gets no state from A for B
        late = _watch(fleet, "ops", protocol, [TOPICS.state("cam-b"), TOPICS.events("cam-b")])  # synced
        assert not [m for m in late.got if b"forged" in m.payload]
        late.client.stop()
    finally:
        for w in (a, b, op):
            w.client.stop()


def test_forged_state_and_event_on_own_topic_are_ignored_by_the_operator(fleet, protocol):
    """A device can write its own topic only, but could put another device's id in the payload: not accepted."""
    events: list[tuple[str, object]] = []
    deployer = Deployer(fleet.options("ops", protocol), TOPICS, on_event=lambda d, e: events.append((d, e)))
    a = _watch(fleet, "cam-a", protocol, [])
    try:
        deployer.connect(10)
        deployer.sync()  # subscribed for sure
        lie = DeviceState(device="cam-b", online=True, at="2026-12-04T00:00:00Z", groups=["cams"])
        result = ResultEvent(device="cam-b", at="2026-12-04T00:00:00Z", command_id="f" * 32, outcome="committed",
                             model="linear", version="9.9.9")  # fmt: skip
        _publish(a.client, TOPICS.state("cam-a"), encode(lie), retain=True)
        _publish(a.client, TOPICS.events("cam-a"), encode(result))
        truth = ResultEvent(device="cam-a", at="2026-12-04T00:00:00Z", command_id="e" * 32, outcome="failed",
                            model="linear")  # fmt: skip
        _publish(a.client, TOPICS.events("cam-a"), encode(truth))  # the control: the same topic, after
        deadline = time.monotonic() + 10
        while not any(e.command_id == "e" * 32 for _, e in events) and time.monotonic() < deadline:
            time.sleep(0.02)
        deployer.sync()
        assert [(d, e.command_id) for d, e in events] == [("cam-a", "e" * 32)]  # cam-b's "committed" was dropped
        assert "cam-b" not in deployer.states and "cam-a" not in deployer.states
        assert deployer.members("cams") == []
    finally:
        _publish(a.client, TOPICS.state("cam-a"), b"", retain=True)
        a.client.stop()
        deployer.close()


def test_agent_installs_over_the_tls_listener_with_its_provisioned_certificate(fleet, tmp_path, keyring):
    trust = TrustStore.init(tmp_path / "trust", [keyring.public("release")], threshold=1)
    ident = fleet.ids["cam-a"]
    agent = start_agent(
        tmp_path, trust.directory, fleet.url, device="cam-a", prefix=PREFIX, protocol="auto",
        labels={"group": "cams"}, **{"broker.ca": str(ident.ca), "broker.cert": str(ident.cert),
                                     "broker.key": str(ident.key)},
    )  # fmt: skip
    try:
        assert agent.link.client.wait_connected(10)
        bundle = padded_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=2.0, pad=6_000)
        report = deploy(
            bundle, options=fleet.options("ops", "auto"), keys=[keyring.keys["release"]], group="cams",
            prefix=PREFIX, wait=True, timeout=30, chunk_size=1024,
        )  # fmt: skip
        assert sorted(report.devices) == ["cam-a"], report.devices
        assert report.ok, report.devices
        np.testing.assert_allclose(agent.infer(X), linear_reference(X, 2.0), rtol=1e-5)
    finally:
        agent.stop()


def test_revoked_device_is_refused_after_a_reload(fleet):
    before = MqttClient(fleet.options("cam-c", "5"))
    before.connect(5)  # cam-c's certificate works
    before.stop()
    fleet.ca.revoke("cam-c")
    files = fleet.rewrite()
    assert "user cam-c" not in files.acl.read_text()
    assert fleet.broker.proc is not None
    os.kill(fleet.broker.proc.pid, signal.SIGHUP)  # mosquitto rereads the ACL and the CRL
    time.sleep(0.5)
    after = MqttClient(fleet.options("cam-c", "5"))
    with pytest.raises(BrokerConnectionError):
        after.connect(2)
    after.stop()
    still = MqttClient(fleet.options("cam-a", "5"))  # the others are unaffected
    still.connect(5)
    still.stop()
