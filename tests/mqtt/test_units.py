"""The protocol, the chunk receiver, the replay rules and the helpers, without a broker."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from edgepack.agent.link import CommandBook
from edgepack.agent.receiver import ChunkReceiver
from edgepack.errors import (
    ChunkMismatchError,
    ConfigError,
    IndexMismatchError,
    InstallError,
    MalformedMessageError,
    QuotaExceededError,
    ReplayedCommandError,
    SelfTestError,
    SignatureInvalidError,
    StaleCommandError,
    TargetMismatchError,
    ThresholdNotMetError,
    UnknownCommandError,
)
from edgepack.manifest import utc_now
from edgepack.mqtt import BrokerAddress, MqttOptions
from edgepack.protocol import (
    CommandTarget,
    Topics,
    encode,
    error_code,
    groups_from_labels,
    parse_command,
    parse_event,
    parse_index,
    sign_command,
    verify_command,
)
from edgepack.transfer import chunk_bundle
from edgepack.units import parse_size
from tests.mqtt.helpers import install_command, padded_bundle, rollback_command, signed

ME = CommandTarget(device="cam-1")


@pytest.fixture
def chunked(tmp_path, keyring):
    return chunk_bundle(padded_bundle(tmp_path, keyring.keys["release"], pad=5000), 1024)


def test_topics_round_trip_and_refuse_wildcards():
    topics = Topics("site/a")
    assert topics.parse(topics.device_command("cam-1")).kind == "device_cmd"
    assert topics.parse(topics.group_command("site=plant-3")).key == "site=plant-3"
    assert topics.parse(topics.chunk("ab" * 32)).kind == "chunk"
    assert topics.parse("other/devices/cam-1/cmd") is None
    for bad in ("", "a/+/b", "a/#", "a//b", "/a"):
        with pytest.raises(MalformedMessageError):
            Topics(bad)
    with pytest.raises(MalformedMessageError):
        topics.device_command("cam/1")


def test_groups_come_from_labels():
    labels = {"group": "cams,doors", "site": "plant-3", "bad": "a/b"}
    # "bad=a/b" and "group=cams,doors" cannot name a topic level, so they are left out
    assert groups_from_labels(labels) == ["cams", "doors", "site=plant-3"]
    assert groups_from_labels({"group": "cams"}) == ["cams", "group=cams"]


def test_parse_command_refuses_malformed_unknown_and_other_versions(chunked, keyring):
    good = signed(install_command(chunked, ME), keyring.keys["release"])
    assert parse_command(encode(good)) == good
    with pytest.raises(MalformedMessageError, match="not valid JSON"):
        parse_command(b"{")
    with pytest.raises(MalformedMessageError, match="version 2"):
        parse_command(json.dumps({"v": 2}).encode())
    with pytest.raises(UnknownCommandError, match="'format'"):
        parse_command(json.dumps({"v": 1, "command": {"action": "format"}}).encode())
    extra = json.loads(encode(good))
    extra["command"]["note"] = "hi"
    with pytest.raises(MalformedMessageError, match="note"):
        parse_command(json.dumps(extra).encode())
    with pytest.raises(MalformedMessageError, match="NaN"):
        parse_command(b'{"v": 1, "command": {"action": "install", "seq": NaN}}')


def test_command_signatures(chunked, trust, keyring):
    command = install_command(chunked, ME)
    assert verify_command(sign_command(command, [keyring.keys["release"]]), trust)
    with pytest.raises(ThresholdNotMetError):
        verify_command(sign_command(command, []), trust)
    good = sign_command(command, [keyring.keys["release"]])
    redirected = good.model_copy(update={"command": command.model_copy(update={"to": CommandTarget(device="cam-2")})})
    with pytest.raises(SignatureInvalidError):
        verify_command(redirected, trust)


def test_chunk_index_sizes_must_describe_one_file(chunked):
    assert parse_index(chunked.index_bytes) == chunked.index
    raw = json.loads(chunked.index_bytes)
    raw["chunks"][0]["size"] += 1
    raw["chunks"][-1]["size"] -= 1
    with pytest.raises(IndexMismatchError, match="lies about sizes: chunk 0"):
        parse_index(json.dumps(raw).encode())
    raw = json.loads(chunked.index_bytes)
    raw["size"] += 5000
    with pytest.raises(IndexMismatchError, match="chunks listed"):
        parse_index(json.dumps(raw).encode())


def test_receiver_checks_chunks_resumes_and_assembles(tmp_path, chunked):
    command = install_command(chunked, ME)
    receiver = ChunkReceiver(tmp_path / "incoming")
    with pytest.raises(IndexMismatchError, match="hashes to"):
        receiver.accept_index(command, chunked.index_bytes + b" ")
    transfer = receiver.open(receiver.accept_index(command, chunked.index_bytes))
    refs = chunked.index.chunks
    assert transfer.offer(refs[0].sha256, chunked.chunk(0)) and not transfer.offer(refs[0].sha256, chunked.chunk(0))
    with pytest.raises(ChunkMismatchError, match="hashes to"):
        transfer.offer(refs[1].sha256, chunked.chunk(2))
    with pytest.raises(ChunkMismatchError, match="bytes where the index says"):
        transfer.offer(refs[1].sha256, b"short")
    with pytest.raises(ChunkMismatchError, match="not part of"):
        transfer.offer("0" * 64, b"x")
    transfer.offer(refs[1].sha256, chunked.chunk(1))
    transfer.offer(refs[2].sha256, chunked.chunk(2))
    transfer.close()  # the writer thread has put them on disk
    c = transfer.counters
    assert (c.received_chunks, c.duplicate_chunks, c.rejected_chunks) == (3, 1, 3)
    with open(transfer.part, "r+b") as fh:  # a write torn by a power cut: chunk 1's region is damaged
        fh.seek(1024 + 100)
        fh.write(b"torn")

    # "restart": a new receiver finds the index, hashes the partial file, and asks only for the rest
    again = ChunkReceiver(tmp_path / "incoming")
    resumed = again.open(again.saved_index(command))
    missing = resumed.missing_positions()
    assert 1 in missing and 0 not in missing and 2 not in missing  # (a chunk of zeros may be "held" by the holes)
    assert resumed.counters.resumed_bytes == chunked.index.size - sum(refs[p].size for p in missing)
    for position in resumed.missing_positions():
        resumed.offer(refs[position].sha256, chunked.chunk(position))
    assert resumed.assemble().read_bytes() == chunked.path.read_bytes()
    assert not resumed.part.exists()
    # stopped after assembling, before the install ended: nothing is fetched again
    assert again.open(chunked.index).missing() == []


def test_quota_is_checked_up_front(tmp_path, chunked):
    receiver = ChunkReceiver(tmp_path / "incoming", quota_bytes=chunked.index.size, usage=lambda: 0)
    command = install_command(chunked, ME)
    with pytest.raises(QuotaExceededError, match="disk quota"):
        receiver.accept_index(command, chunked.index_bytes)
    assert not (tmp_path / "incoming" / chunked.bundle / "bundle.part").exists()
    ChunkReceiver(tmp_path / "x", quota_bytes=3 * chunked.index.size, usage=lambda: 0).check_space(chunked.index.size)


def test_command_book_replay_rules_survive_a_restart(tmp_path, chunked, keyring):
    key = keyring.keys["release"]
    (tmp_path / ".commands.json.x1y2z3.tmp").write_text("{")  # an atomic write cut short by a crash
    book = CommandBook(tmp_path / "commands.json")
    assert not list(tmp_path.glob(".commands.json.*.tmp")), "a killed write leaves no temporary file behind"
    first = signed(install_command(chunked, ME), key)
    assert book.check(first, retained=False)
    book.accept(first)
    assert not book.check(first, retained=False)  # pending: a redelivery, ignored
    book.finish(first.command.id, "committed")
    book = CommandBook(tmp_path / "commands.json")
    assert not book.check(first, retained=True)  # the retained copy, again after a reconnect
    with pytest.raises(ReplayedCommandError):
        book.check(first, retained=False)
    with pytest.raises(StaleCommandError, match="not newer"):
        book.check(signed(install_command(chunked, ME, seq=first.command.seq), key), retained=False)
    with pytest.raises(StaleCommandError, match="expired"):
        book.check(
            signed(install_command(chunked, ME, expires_at=utc_now() - timedelta(seconds=1)), key), retained=False
        )
    # a newer install supersedes a pending one of the same model, and so does a rollback ("go back")
    second, third = signed(install_command(chunked, ME), key), signed(install_command(chunked, ME), key)
    book.accept(second)
    assert book.accept(rollback := signed(rollback_command("linear", ME), key)) == [second]
    assert book.accept(third) == []
    assert [p.command.id for p in CommandBook(tmp_path / "commands.json").pending()] == [
        rollback.command.id, third.command.id,
    ]  # fmt: skip


@pytest.mark.parametrize("damage", [b"{not json", b'{"version": 1, "pending": [{"v": 1}]}', b"[]", b"\x00" * 10])
def test_a_corrupt_command_book_is_quarantined_and_refuses_older_commands(tmp_path, chunked, keyring, damage):
    """commands.json that cannot be read: kept aside, an empty book with floors rebuilt from the journal."""
    from edgepack.agent.link.book import journal_times
    from edgepack.agent.store import DeviceStore

    key = keyring.keys["release"]
    old = signed(install_command(chunked, ME), key)  # issued before the install the journal records
    store = DeviceStore(tmp_path / "state")
    store.new_journal("linear", chunked.bundle, "1.0.0", "install").advance("committed")
    path = store.root / "commands.json"
    path.write_bytes(damage)
    book = CommandBook(path, journals=lambda: journal_times(store))
    kept = list(store.root.glob("commands.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damage, "the corrupt file is kept for a post-mortem"
    assert book.notices and "corrupt" in book.notices[0] and kept[0].name in book.notices[0]
    assert book.pending() == []
    with pytest.raises(StaleCommandError, match="rebuilt after corruption"):
        book.check(old, retained=False)
    assert not book.check(old, retained=True)  # its retained copy comes back on subscribe: ignored quietly
    new = signed(install_command(chunked, ME, issued_at=utc_now() + timedelta(seconds=2)), key)  # second precision
    assert book.check(new, retained=False)
    book.accept(new)
    again = CommandBook(path, journals=lambda: journal_times(store))  # the rebuilt book is saved, floors too
    assert not again.notices and [p.command.id for p in again.pending()] == [new.command.id]
    other = signed(install_command(chunked, ME, model="other"), key)  # no journal for it: no floor
    assert again.check(other, retained=False)
    older = signed(install_command(chunked, ME, seq=new.command.seq + 1), key)  # a newer seq, an old issue time
    with pytest.raises(StaleCommandError, match="rebuilt after corruption"):
        again.check(older, retained=False)


def test_error_codes_name_the_most_specific_cause():
    try:
        try:
            raise TargetMismatchError("arm64")
        except TargetMismatchError as exc:
            raise InstallError("refused") from exc
    except InstallError as wrapped:
        assert error_code(wrapped) == "target"
    assert error_code(SelfTestError("x")) == "selftest"
    assert error_code(QuotaExceededError("x")) == "quota"
    assert error_code(ValueError("x")) == "internal"


def test_events_are_lenient(tmp_path):
    event = parse_event(b'{"v":1,"kind":"need","device":"d","at":"2026-01-01T00:00:00Z","bundle":"b","new":1}')
    assert event.kind == "need" and event.chunks == []


def test_urls_options_and_sizes():
    assert BrokerAddress.parse("mqtts://broker.example") == BrokerAddress("broker.example", 8883, True)
    assert BrokerAddress.parse("mqtt://10.0.0.2:1884").port == 1884
    for bad in ("http://x", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(ConfigError):
            BrokerAddress.parse(bad)
    with pytest.raises(ConfigError, match="--cert with --key"):
        MqttOptions(url="mqtts://h", client_id="c", cert=Path("c.pem"))
    with pytest.raises(ConfigError):
        MqttOptions(url="mqtt://h", client_id="c", protocol="4")
    assert [parse_size(s, "x") for s in ("1024", "256k", "256KiB", "2M", "1.5k")] == [
        1024,
        262144,
        262144,
        2 << 20,
        1536,
    ]
    with pytest.raises(ConfigError):
        parse_size("lots", "--max-rate")


def test_operator_commands_wait_for_the_broker_as_long_as_they_are_told(tmp_path: Path) -> None:
    """deploy / serve-bundles / clear-bundles pass connect_timeout to the connection (it used to be ignored)."""
    import socket
    import threading

    from edgepack.errors import BrokerConnectionError
    from edgepack.fleet.deploy import clear_bundles, deploy, serve_bundles
    from edgepack.keys import SigningKey
    from tests.mqtt.helpers import padded_bundle

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens here once closed
    key = SigningKey.generate()
    bundle = padded_bundle(tmp_path, key)
    dead = MqttOptions(url=f"mqtt://127.0.0.1:{port}", client_id="op")
    calls = [
        lambda: deploy(bundle, options=dead, keys=[key], device="d", connect_timeout=0.5),
        lambda: serve_bundles([bundle], options=dead, stop=threading.Event(), connect_timeout=0.5),
        lambda: clear_bundles([bundle], options=dead, connect_timeout=0.5),
    ]
    for call in calls:
        with pytest.raises(BrokerConnectionError, match=r"within 0.5 s"):  # the default says "within 10 s"
            call()
