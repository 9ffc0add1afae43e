"""The device never wedges on a transfer: stalled transfers fail with a reason, rollbacks and newer installs
pre-empt a stuck one, expired commands are not run after a restart, throttling never starves the connection,
and the broker drops oversized messages before the agent reads them (MQTT 5 Maximum Packet Size)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from edgepack.agent.link import CommandBook, LinkOptions
from edgepack.fleet.deploy import Deployer
from edgepack.manifest import utc_now
from edgepack.protocol import CommandTarget
from edgepack.transfer import ChunkedBundle, chunk_bundle
from tests.mqtt.helpers import install_command, options, padded_bundle, rollback_command, signed, start_agent

pytestmark = pytest.mark.mqtt

ME = CommandTarget(device="cam-1")
QUICK = {"stall_s": 0.3, "need_max_s": 0.6, "progress_interval_s": 0.05, "reconnect_min_s": 1, "reconnect_max_s": 1}
STUCK_FOREVER = LinkOptions(**QUICK, max_unanswered_needs=1000, deadline_min_s=600)


def _publish(op: Deployer, chunked: ChunkedBundle, *, index: bool = True, chunks: range = range(0)) -> None:
    """Publish (retained) the index and only the chunks at ``chunks``: the others are gone from the broker."""
    infos = []
    if index:
        infos.append(op.client.publish(op.topics.index(chunked.bundle), chunked.index_bytes, retain=True))
    for position in chunks:
        ref = chunked.index.chunks[position]
        infos.append(op.client.publish(op.topics.chunk(ref.sha256), chunked.chunk(position), retain=True))
    op.client.wait_published(infos, 10)


def _bundle(tmp_path, keyring, version: str, *, pad: int = 6000, chunk: int = 1024, **kwargs) -> ChunkedBundle:
    return chunk_bundle(padded_bundle(tmp_path / version, keyring.keys["release"], version=version, pad=pad, **kwargs), chunk)


@pytest.fixture
def operator(broker, protocol, topics):
    op = Deployer(options(broker.url, protocol), topics)
    op.connect()
    yield op
    op.close()


def test_a_transfer_whose_chunks_are_gone_fails_with_a_reason(tmp_path, broker, protocol, topics, events, keyring,
                                                              trust, operator):  # fmt: skip
    give_up = LinkOptions(**QUICK, max_unanswered_needs=2, deadline_min_s=600)
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix,
                         protocol=protocol, link_options=give_up)  # fmt: skip
    release = keyring.keys["release"]
    try:
        assert device.link.client.wait_connected(10)
        chunked = _bundle(tmp_path, keyring, "1.0.0")
        _publish(operator, chunked, chunks=range(2))  # the index and 2 chunks; the rest was cleared
        command = signed(install_command(chunked, ME), release)
        operator.send(command)
        result = operator.wait(command.command.id, ["cam-1"], 60)["cam-1"]
        assert (result.outcome, result.code) == ("failed", "stalled"), result
        assert chunked.bundle[:12] in result.reason and "never arrived" in result.reason, result.reason
        assert "positions 2, 3" in result.reason and "deploy the bundle again" in result.reason
        assert len(events.of("need", command.command.id)) == 2  # asked twice, then gave up
        assert device.serving() is None and not device.link.busy

        # the index gone too: the same, for the index
        other = _bundle(tmp_path, keyring, "1.1.0")
        command = signed(install_command(other, ME), release)
        operator.send(command)
        result = operator.wait(command.command.id, ["cam-1"], 60)["cam-1"]
        assert (result.outcome, result.code) == ("failed", "stalled") and "chunk index" in result.reason, result

        # not wedged: the bundle published whole installs at once
        operator.publish_bundle(chunked)
        command = signed(install_command(chunked, ME), release)
        operator.send(command)
        assert operator.wait(command.command.id, ["cam-1"], 60)["cam-1"].outcome == "committed"
        assert device.serving() == "1.0.0"
    finally:
        device.stop()


def test_a_job_past_its_deadline_fails(tmp_path, broker, protocol, topics, events, keyring, trust, operator):
    short = LinkOptions(**QUICK, max_unanswered_needs=1000, deadline_min_s=1.5, deadline_rate=1 << 30)
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix,
                         protocol=protocol, link_options=short)  # fmt: skip
    try:
        assert device.link.client.wait_connected(10)
        chunked = _bundle(tmp_path, keyring, "1.0.0")
        _publish(operator, chunked, chunks=range(1))
        command = signed(install_command(chunked, ME), keyring.keys["release"])
        operator.send(command)
        result = operator.wait(command.command.id, ["cam-1"], 60)["cam-1"]
        assert (result.outcome, result.code) == ("failed", "deadline") and "deadline" in result.reason, result
        assert not (tmp_path / "cam-1" / "incoming" / chunked.bundle).exists()  # the partial transfer is gone
    finally:
        device.stop()


def test_a_rollback_pre_empts_a_stuck_install(tmp_path, broker, protocol, topics, events, keyring, trust, operator):
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix,
                         protocol=protocol, link_options=STUCK_FOREVER)  # fmt: skip
    release = keyring.keys["release"]
    try:
        for version in ("1.0.0", "2.0.0"):
            device.agent.install(padded_bundle(tmp_path / f"local-{version}", release, version=version))
        assert device.link.client.wait_connected(10)
        stuck = _bundle(tmp_path, keyring, "3.0.0")
        _publish(operator, stuck, chunks=range(1))
        install = signed(install_command(stuck, ME), release)
        operator.send(install)
        events.wait_for(lambda e: e.kind == "need" and e.command_id == install.command.id, what="the stuck install")
        rollback = signed(rollback_command("linear", ME), release)
        operator.send(rollback)
        done = operator.wait(rollback.command.id, ["cam-1"], 30)["cam-1"]
        assert (done.outcome, done.version) == ("committed", "1.0.0"), done
        assert device.serving() == "1.0.0"
        canceled = operator.wait(install.command.id, ["cam-1"], 10)["cam-1"]
        assert (canceled.outcome, canceled.code) == ("superseded", "canceled"), canceled
        assert rollback.command.id in canceled.reason
        assert not (tmp_path / "cam-1" / "incoming" / stuck.bundle).exists()
    finally:
        device.stop()


def test_a_newer_install_pre_empts_a_stuck_one(tmp_path, broker, protocol, topics, events, keyring, trust, operator):
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix,
                         protocol=protocol, link_options=STUCK_FOREVER)  # fmt: skip
    release = keyring.keys["release"]
    try:
        assert device.link.client.wait_connected(10)
        stuck = _bundle(tmp_path, keyring, "1.0.0")
        _publish(operator, stuck, chunks=range(2))
        first = signed(install_command(stuck, ME), release)
        operator.send(first)
        events.wait_for(lambda e: e.kind == "need" and e.command_id == first.command.id, what="the stuck install")
        newer = _bundle(tmp_path, keyring, "1.1.0", scale=2.0)
        operator.publish_bundle(newer)
        second = signed(install_command(newer, ME), release)
        operator.send(second)
        assert operator.wait(second.command.id, ["cam-1"], 30)["cam-1"].outcome == "committed"
        result = operator.wait(first.command.id, ["cam-1"], 10)["cam-1"]
        assert (result.outcome, result.code) == ("superseded", "superseded") and second.command.id in result.reason
        assert device.serving() == "1.1.0"
    finally:
        device.stop()


def test_an_expired_pending_command_is_not_run_on_resume(tmp_path, broker, protocol, topics, events, keyring, trust,
                                                         operator):  # fmt: skip
    """The agent stopped with an install pending; it expired meanwhile: at the next start it ends as failed
    (expired) without running, although its bundle is on the broker in full."""
    release = keyring.keys["release"]
    chunked = _bundle(tmp_path, keyring, "1.0.0")
    operator.publish_bundle(chunked)
    stale = signed(install_command(chunked, ME, expires_at=utc_now() - timedelta(minutes=1)), release)
    fresh = signed(rollback_command("other", ME), release)  # pending too, not expired: it does run (and fails)
    (tmp_path / "cam-1").mkdir()
    book = CommandBook(tmp_path / "cam-1" / "commands.json")
    book.accept(stale)
    book.accept(fresh)
    operator.send(stale)  # its retained copy comes back on subscribe: it must not run either
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix,
                         protocol=protocol)  # fmt: skip
    try:
        result = operator.wait(stale.command.id, ["cam-1"], 30)["cam-1"]
        assert (result.outcome, result.code) == ("failed", "expired") and "not run" in result.reason, result
        events.wait_for(lambda e: e.kind == "result" and e.command_id == fresh.command.id, what="the other command")
        assert not events.of("accepted", stale.command.id)
        assert events.of("accepted", fresh.command.id)[0].resumed
        assert device.serving() is None and not device.link.busy
    finally:
        device.stop()


def test_throttling_never_starves_the_connection(tmp_path, broker, protocol, topics, events, keyring, trust, operator):
    """At 1 KiB/s a 12 KiB chunk takes 12 s, more than 1.5 keepalives of 5 s: sleeping on paho's network thread
    (the old throttle) made the broker drop the device. Now the connection stays, and a command published
    during the transfer is handled at once, not after it."""
    slow = LinkOptions(**QUICK, max_rate=1024)
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix,
                         protocol=protocol, link_options=slow, **{"broker.keepalive": 5})  # fmt: skip
    release = keyring.keys["release"]
    try:
        assert device.link.client.wait_connected(10)
        chunked = _bundle(tmp_path, keyring, "1.0.0", pad=12_000, chunk=12 * 1024)
        assert len(chunked.index.chunks) == 2
        operator.publish_bundle(chunked)
        command = signed(install_command(chunked, ME), release)
        operator.send(command)
        events.wait_for(lambda e: e.kind == "progress" and e.phase == "download" and e.held_bytes > 0,
                        what="the first chunk")  # fmt: skip
        foreign = signed(rollback_command("linear", ME), keyring.keys["stranger"])
        operator.send(foreign)
        events.wait_for(lambda e: e.kind == "rejected" and e.command_id == foreign.command.id, what="the rejection")
        assert not events.of("result", command.command.id), "the command was handled during the transfer"
        held = device.link.status()
        assert held["current"] == command.command.id and held["current_state"] == "download", held
        result = operator.wait(command.command.id, ["cam-1"], 60)["cam-1"]
        assert result.outcome == "committed", result
        assert result.timings["download"] >= 12 * 1024 / 1024 * 0.9  # the rate was kept
        assert device.link.client.connects == 1 and device.link.connected, device.link.client.last_error
    finally:
        device.stop()


@pytest.mark.parametrize("protocol", ["5"])
def test_the_broker_drops_oversized_messages_before_the_agent(tmp_path, broker, protocol, topics, events, keyring,
                                                              trust, operator):  # fmt: skip
    small = LinkOptions(**QUICK, max_chunk_size=64 * 1024)  # Maximum Packet Size 128 KiB
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix,
                         protocol=protocol, link_options=small)  # fmt: skip
    try:
        assert device.link.client.wait_connected(10)
        # the device subscribes before it publishes its state, so once its state is out it hears live commands
        events.wait_for_state("cam-1", lambda s: s.online)
        topic = topics.device_command("cam-1")
        operator.client.wait_published([operator.client.publish(topic, b"{" + b" " * (1 << 20))], 10)
        operator.client.wait_published([operator.client.publish(topic, b"{not json")], 10)
        events.wait_for(lambda e: e.kind == "rejected" and "not valid JSON" in e.reason, what="the small one")
        assert not [e for e in events.of("rejected") if "more than" in e.reason], "the 1 MiB message reached the agent"
        assert device.link.client.connects == 1 and device.link.connected
    finally:
        device.stop()


def test_a_corrupt_command_book_does_not_stop_the_link(tmp_path, broker, protocol, topics, events, keyring, trust,
                                                       operator):  # fmt: skip
    (tmp_path / "cam-1").mkdir()
    (tmp_path / "cam-1" / "commands.json").write_bytes(b"\x00garbage")
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix,
                         protocol=protocol)  # fmt: skip
    try:
        state = events.wait_for_state("cam-1", lambda s: s.online and s.notices)
        assert "commands.json was corrupt" in state.notices[0]
        assert list((tmp_path / "cam-1").glob("commands.json.corrupt-*"))
        chunked = _bundle(tmp_path, keyring, "1.0.0")
        operator.publish_bundle(chunked)
        command = signed(install_command(chunked, ME), keyring.keys["release"])
        operator.send(command)
        assert operator.wait(command.command.id, ["cam-1"], 30)["cam-1"].outcome == "committed"
    finally:
        device.stop()
