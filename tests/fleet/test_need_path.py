"""The mechanisms that keep a fleet's missing-chunk requests from multiplying broker ingress (issue 13's
1,000-device benchmark: 15 bundle copies of ingress from a republish storm), on a real mosquitto:

- a device that lost a chunk the broker still holds gets it back by subscribing again — the broker's
  retained copy, to this device alone, no ``need`` and no new upload;
- a ``need`` names only the chunks the device asked for and did not get, never the whole missing rest;
- the operator does not publish again what the broker holds (a bundle it published on a connection not
  interrupted since) at a device's first request, and publishes a chunk again at most once per window
  however many devices ask for it.
"""

from __future__ import annotations

import threading
import time

import pytest

from edgepack.agent.link import LinkOptions
from edgepack.agent.link.fetch import Fetcher
from edgepack.fleet.deploy import Deployer
from edgepack.manifest import utc_now
from edgepack.mqtt import MqttClient
from edgepack.protocol import CommandTarget, NeedEvent, encode
from edgepack.transfer import chunk_bundle
from tests.mqtt.helpers import install_command, options, padded_bundle, signed, start_agent

pytestmark = pytest.mark.mqtt

QUICK = {"stall_s": 0.3, "need_max_s": 0.6, "progress_interval_s": 0.05, "reconnect_min_s": 1, "reconnect_max_s": 1}
ME = CommandTarget(device="cam-1")


def _chunked(tmp_path, keyring, version="1.0.0"):
    return chunk_bundle(padded_bundle(tmp_path / version, keyring.keys["release"], version=version, pad=6000), 1024)


def _publish_only(op: Deployer, chunked, positions) -> None:
    infos = [op.client.publish(op.topics.index(chunked.bundle), chunked.index_bytes, retain=True)]
    for position in positions:
        ref = chunked.index.chunks[position]
        infos.append(op.client.publish(op.topics.chunk(ref.sha256), chunked.chunk(position), retain=True))
    op.client.wait_published(infos, 10)


@pytest.fixture
def operator(broker, topics):
    op = Deployer(options(broker.url, "5"), topics)
    op.connect()
    yield op
    op.close()


def test_a_lost_chunk_the_broker_holds_comes_back_by_subscribing_again(
    tmp_path, broker, topics, events, keyring, trust, operator, monkeypatch
):
    chunked = _chunked(tmp_path, keyring)
    lost = chunked.index.chunks[2].sha256
    dropped: list[str] = []
    real = Fetcher.on_chunk

    def lossy(self, sha256, topic, payload):  # the first delivery of chunk 2 never reaches the device
        if sha256 == lost and not dropped:
            dropped.append(sha256)
            return None
        return real(self, sha256, topic, payload)

    monkeypatch.setattr(Fetcher, "on_chunk", lossy)
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix, protocol="5",
                         link_options=LinkOptions(**QUICK, fetch_window=2, max_unanswered_needs=3))  # fmt: skip
    try:
        assert device.link.client.wait_connected(10)
        _publish_only(operator, chunked, range(len(chunked.index.chunks)))  # the broker holds every chunk
        command = signed(install_command(chunked, ME), keyring.keys["release"])
        operator.send(command)
        result = operator.wait(command.command.id, ["cam-1"], 60)["cam-1"]
        assert result.outcome == "committed", result
        assert dropped == [lost]
        assert events.of("need", command.command.id) == []  # nobody was asked to publish anything again
    finally:
        device.stop()


def test_a_need_names_only_the_chunks_asked_for(tmp_path, broker, topics, events, keyring, trust, operator):
    chunked = _chunked(tmp_path, keyring)
    total = len(chunked.index.chunks)
    assert total >= 6
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix, protocol="5",
                         link_options=LinkOptions(**QUICK, fetch_window=2, max_unanswered_needs=2))  # fmt: skip
    try:
        assert device.link.client.wait_connected(10)
        _publish_only(operator, chunked, range(2))  # chunks 2… are gone from the broker
        command = signed(install_command(chunked, ME), keyring.keys["release"])
        operator.send(command)
        result = operator.wait(command.command.id, ["cam-1"], 60)["cam-1"]
        assert (result.outcome, result.code) == ("failed", "stalled"), result
        needs = events.of("need", command.command.id)
        assert len(needs) == 2
        assert [n.chunks for n in needs] == [[2, 3], [2, 3]]  # the window's two, not all of 2…{total - 1}
        assert f"{total - 2} of {total} chunks" in result.reason  # the give-up still says what is missing
    finally:
        device.stop()


def test_the_operator_publishes_a_chunk_again_once_per_window(tmp_path, broker, topics, keyring, operator):
    chunked = _chunked(tmp_path, keyring)
    operator.publish_bundle(chunked)
    sha = chunked.index.chunks[2].sha256
    copies: list[bool] = []
    seen = threading.Event()

    def count(message) -> None:
        copies.append(message.retained)
        seen.set()

    counter = MqttClient(options(broker.url, "5", "count"), on_message=count)
    counter.subscribe([topics.chunk(sha)])
    counter.connect(10)
    asker = MqttClient(options(broker.url, "5", "ask"))
    asker.connect(10)
    try:
        assert seen.wait(10) and copies == [True]  # the retained copy

        def ask(seq: int) -> None:  # thirty devices ask for chunk 2 within a moment
            infos = []
            for i in range(30):
                need = NeedEvent(device=f"d-{i}", at=utc_now(), seq=seq, bundle=chunked.bundle, chunks=[2, 3])
                infos.append(asker.publish(topics.events(f"d-{i}"), encode(need)))
            asker.wait_published(infos, 10)
            time.sleep(1.5)

        ask(1)
        # the operator published the bundle on this very connection, never interrupted: the broker holds
        # it, so a device's first request is not answered (the devices subscribe again before they ask)
        assert copies == [True] and operator.needs_received == 30
        ask(2)  # asked again: answered, once for all of them
        assert copies.count(False) == 1, copies
    finally:
        asker.stop()
        counter.stop()
