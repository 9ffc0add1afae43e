"""Rollouts on a two-node RabbitMQ cluster (Debian's rabbitmq-server 3.10 with rabbitmq_mqtt: MQTT 3.1.1
only), real agents connected to the other node than the operator. What the cluster breaks, measured here
(``docs/scaling.md``): a retained message lives on the node that received it, and RabbitMQ 3.x gives
retained messages to exact-topic subscriptions only, never to wildcard ones (the operator's
``devices/+/state``). What makes the protocol hold:

- devices publish their state as a heartbeat (``link.state_interval_s``): the registry and a rollout's
  membership come from live states, which a cluster routes to every node;
- the operator given the other node (``--node``) writes every retained message (bundle, commands) on
  both nodes: devices on either node fetch them from their own node, with no ``need``;
- without ``--node`` the device's ``need`` path carries the rollout: the index and chunks it cannot find
  on its node are published again, live, by the operator, and reach it across the cluster.
"""

from __future__ import annotations

import time
import uuid

import pytest

from edgepack.fleet.engine import RolloutEngine, create_rollout
from edgepack.fleet.journal import Journal
from edgepack.fleet.plan import RolloutPlan, parse_waves
from edgepack.fleet.registry import list_devices
from edgepack.mqtt import MqttClient, MqttOptions
from edgepack.protocol import Topics, parse_event
from tests.fleet.agents import FAST, start_device
from tests.fleet.rabbit import RabbitCluster, find_rabbitmq
from tests.mqtt.helpers import padded_bundle

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

HEARTBEAT = FAST.model_copy(update={"state_interval_s": 1.0})


def _opts(url: str, name: str = "op") -> MqttOptions:
    return MqttOptions(url=url, client_id=f"{name}-{uuid.uuid4().hex[:8]}", protocol="3.1.1")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if find_rabbitmq() is None:
        print("SKIP: rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server): no cluster to test on")
    started = time.monotonic()
    cluster = RabbitCluster(tmp_path_factory.mktemp("rabbit")).start()
    print(f"two-node RabbitMQ cluster up in {time.monotonic() - started:.0f} s: {cluster.running_nodes()}")
    yield cluster
    cluster.stop()


class _Needs:
    """Counts the devices' need events (live, from any node)."""

    def __init__(self, url: str, topics: Topics) -> None:
        self.needs: list[tuple[str, bool, int]] = []
        self.client = MqttClient(_opts(url, "needs"), on_message=self._on)
        self.client.subscribe([topics.all_events])
        self.client.connect(10)

    def _on(self, message) -> None:
        event = parse_event(message.payload)
        if event.kind == "need":
            self.needs.append((event.device, event.index, len(event.chunks)))


def test_rollouts_across_a_two_node_rabbitmq_cluster(tmp_path, cluster, keyring, trust):
    a, b = cluster.nodes
    topics = Topics(f"t{uuid.uuid4().hex[:6]}")
    key = keyring.keys["release"]
    v1 = padded_bundle(tmp_path, key, version="1.0.0", scale=1.0)
    v2 = padded_bundle(tmp_path, key, version="2.0.0", scale=2.0, pad=40_000)
    v3 = padded_bundle(tmp_path, key, version="3.0.0", scale=3.0, pad=40_000)
    devices = [start_device(tmp_path, trust.directory, node.url, device=name, prefix=topics.prefix, protocol="3.1.1",
                            labels={"site": "lyon"}, preinstall=v1, link_options=HEARTBEAT)
               for name, node in (("cam-a0", a), ("cam-b0", b), ("cam-b1", b))]  # fmt: skip
    needs = _Needs(a.url, topics)
    try:
        # the registry: retained states reach no wildcard subscriber; the heartbeats do, from both nodes
        found = list_devices(_opts(a.url), prefix=topics.prefix, nodes=[_opts(b.url)], listen_s=2.5)
        assert {r.device for r in found} == {"cam-a0", "cam-b0", "cam-b1"}
        assert all(r.health and r.health["ok"] for r in found)

        figures = {}
        runs = ((v2, "2.0.0", [_opts(b.url)], "with --node"), (v3, "3.0.0", [], "operator on node A only"))
        for bundle, version, nodes, label in runs:
            journal = Journal(tmp_path / f"fleet-{label[:4]}.sqlite")
            plan = RolloutPlan(waves=parse_waves("1,100%"), success_gate=100, chunk_size=16 * 1024,
                               device_timeout_s=90)  # fmt: skip
            rid = create_rollout(journal, bundle, selector="site=lyon", plan=plan, prefix=topics.prefix)
            engine = RolloutEngine(journal, rid, options=_opts(a.url), keys=[key], tick_s=0.05, nodes=nodes)
            before = len(needs.needs)
            started = time.monotonic()
            rollout = engine.run()
            wall = time.monotonic() - started
            assert rollout.status == "completed", rollout.reason
            rows = {e.device: e.state for e in journal.executions(rid)}
            assert rows == {"cam-a0": "succeeded", "cam-b0": "succeeded", "cam-b1": "succeeded"}, rows
            asked = needs.needs[before:]
            figures[label] = (round(wall, 1), len(asked), engine.deployer.republished)
            assert all(d.serving() == version for d in devices)
        print(f"rollout figures (wall s, needs, chunks republished): {figures}")
        assert figures["with --node"][1] == 0, "every node held the bundle: nothing to ask for"
        assert figures["operator on node A only"][1] > 0, "node B held nothing: the need path carried it"
    finally:
        needs.client.stop()
        for d in devices:
            d.stop()
