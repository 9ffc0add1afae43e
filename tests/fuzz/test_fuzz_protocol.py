"""Fuzzing every protocol message decoder: commands, the chunk index, events, device state, and topics.

Inputs: mutated valid messages (fields replaced, removed, added, retyped), arbitrary JSON, raw bytes, deep
nesting and oversized payloads. A parsed command also goes through ``verify_command``: a fuzzed command
never verifies, and refusing it is an EdgepackError too. A parsed index must be self-consistent.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgepack.errors import EdgepackError
from edgepack.fleet.commands import install_command
from edgepack.protocol import (
    MAX_COMMAND_BYTES,
    AcceptedEvent,
    CommandTarget,
    DeviceState,
    ModelStatus,
    NeedEvent,
    ProgressEvent,
    RejectedEvent,
    ResultEvent,
    RollbackCommand,
    Topics,
    TransferCounters,
    encode,
    new_command_fields,
    parse_command,
    parse_event,
    parse_index,
    parse_state,
    positions_of,
    sign_command,
    verify_command,
)
from edgepack.transfer import chunk_bundle
from tests.fuzz.common import (
    COUNTS,
    deep_nesting,
    encode_json,
    fuzz_settings,
    json_values,
    mutated_bytes,
    mutated_json,
    tolerate,
)

AT = datetime(2026, 1, 1, tzinfo=timezone.utc)
SHA = "ab" * 32
INTERESTING = {
    "v": [0, 2, "1", None, 1.5],
    "action": ["install", "rollback", "format", "", None, ["install"]],
    "seq": [0, -1, 2**63, 2**80, "1", 1.5, None],
    "id": ["0" * 31, "g" * 32, "", None],
    "issued_at": ["2026-13-01T00:00:00Z", "yesterday", 0, 1e20, "2026-01-01T00:00:00"],
    "expires_at": ["1970-01-01T00:00:00Z", "9999-12-31T23:59:59Z", -(2**40)],
    "to": [{}, {"device": "a", "group": "b"}, {"device": "a/b"}, {"group": "+"}, {"device": "#"}, "dev"],
    "size": [0, -1, 2**62, "10"],
    "chunk_size": [0, 255, 256, 2**31, 1.0],
    "chunks": [[], [{"sha256": SHA, "size": 0}], [{"sha256": "x", "size": 1}], [None] * 3],
    "bundle": ["", "A" * 64, SHA, None],
    "signatures": [[{"keyid": SHA, "sig": "!!"}], [{"keyid": SHA, "sig": "a" * 300}], [{}] * 20, None],
    "kind": ["accepted", "progress", "need", "result", "rejected", "state", "index", "bogus", None],
    "outcome": ["committed", "rolled_back", "failed", "superseded", "exploded", None],
    "models": [{"x": {"active": 5}}, {"": None}, []],
    "timings": [{"a": "b"}, {"a": float("inf")}, []],
}


@pytest.fixture(scope="module")
def messages(world):
    """One valid message of every kind, as JSON documents."""
    chunked = chunk_bundle(world.bundle_path, 256)
    to = CommandTarget(device="cam-1")
    install = install_command(chunked, new_command_fields(to))
    rollback = RollbackCommand(**new_command_fields(CommandTarget(group="cams")), action="rollback", model="digits")
    base = {"device": "cam-1", "at": AT, "command_id": install.id}
    events = [
        AcceptedEvent(**base, action="install", model="digits"),
        ProgressEvent(**base, phase="download", bundle=chunked.bundle, held_bytes=10, total_bytes=100),
        NeedEvent(**base, bundle=chunked.bundle, chunks=[0, 3]),
        ResultEvent(
            **base,
            outcome="committed",
            model="digits",
            version="1.0.0",
            timings={"stage": 0.1},
            transfer=TransferCounters(received_bytes=5),
        ),
        RejectedEvent(**base, code="signature", reason="bad", topic="edgepack/devices/cam-1/cmd"),
    ]
    state = DeviceState(device="cam-1", online=True, at=AT, labels={"site": "a"}, groups=["site=a"],
                        models={"digits": ModelStatus(active="1.0.0", bundle=chunked.bundle)})  # fmt: skip
    as_json = __import__("json").loads
    return {
        "install": as_json(encode(sign_command(install, [world.key]))),
        "rollback": as_json(encode(sign_command(rollback, [world.key]))),
        "index": as_json(chunked.index_bytes),
        "events": [as_json(encode(e)) for e in events],
        "state": as_json(encode(state)),
    }


def _command(world, payload: bytes, kind: str) -> None:
    signed = tolerate(f"protocol: {kind}: parse_command", parse_command, payload)
    if signed is not None:
        tolerate(f"protocol: {kind}: verify_command", verify_command, signed, world.trust)


def _index(payload: bytes, kind: str) -> None:
    index = tolerate(f"protocol: {kind}: parse_index", parse_index, payload)
    if index is not None:
        assert index.inconsistency() is None
        distinct = list(dict.fromkeys(ref.sha256 for ref in index.chunks))
        first = [next(i for i, ref in enumerate(index.chunks) if ref.sha256 == sha) for sha in distinct]
        assert positions_of(index, distinct) == sorted(first)


@fuzz_settings(600)
@given(data=st.data(), which=st.sampled_from(["install", "rollback"]), canonical=st.booleans())
def test_commands_mutated(world, messages, data, which, canonical):
    doc = data.draw(mutated_json(messages[which], INTERESTING))
    _command(world, encode_json(doc, canonical=canonical), "command (mutated)")


@fuzz_settings(400)
@given(data=st.data())
def test_commands_mutated_bytes(world, messages, data):
    blob = data.draw(mutated_bytes(encode_json(messages["install"], canonical=True)))
    _command(world, blob, "command (mutated bytes)")


@fuzz_settings(600)
@given(data=st.data(), canonical=st.booleans())
def test_chunk_index_mutated(messages, data, canonical):
    doc = data.draw(mutated_json(messages["index"], INTERESTING))
    _index(encode_json(doc, canonical=canonical), "chunk index (mutated)")


@fuzz_settings(300)
@given(data=st.data())
def test_chunk_index_mutated_bytes(messages, data):
    _index(data.draw(mutated_bytes(encode_json(messages["index"], canonical=True))), "chunk index (mutated bytes)")


@fuzz_settings(800)
@given(data=st.data(), canonical=st.booleans())
def test_events_mutated(messages, data, canonical):
    template = data.draw(st.sampled_from(messages["events"]))
    doc = data.draw(mutated_json(template, INTERESTING))
    tolerate("protocol: event (mutated): parse_event", parse_event, encode_json(doc, canonical=canonical))


@fuzz_settings(400)
@given(data=st.data(), canonical=st.booleans())
def test_state_mutated(messages, data, canonical):
    doc = data.draw(mutated_json(messages["state"], INTERESTING))
    tolerate("protocol: state (mutated): parse_state", parse_state, encode_json(doc, canonical=canonical))


DECODERS = {"parse_command": parse_command, "parse_index": parse_index, "parse_event": parse_event,
            "parse_state": parse_state}  # fmt: skip


@fuzz_settings(300)
@given(value=json_values, name=st.sampled_from(sorted(DECODERS)))
def test_decoders_arbitrary_json(value, name):
    doc = {"v": 1, **value} if isinstance(value, dict) else value
    tolerate(f"protocol: arbitrary JSON: {name}", DECODERS[name], encode_json(doc, canonical=True))


@fuzz_settings(300)
@given(blob=st.binary(max_size=1024), name=st.sampled_from(sorted(DECODERS)))
def test_decoders_raw_bytes(blob, name):
    tolerate(f"protocol: raw bytes: {name}", DECODERS[name], blob)


@pytest.mark.parametrize("name", sorted(DECODERS))
@pytest.mark.parametrize("kind", ["list", "dict"])
def test_decoders_deep_nesting_and_oversize(name, kind):
    """Nesting deep enough to exhaust a recursive parser, within each decoder's size cap, and a payload over
    the cap: both are clean refusals (MalformedMessageError), never a RecursionError or a MemoryError."""
    for payload in (
        b'{"v":1,"command":' + deep_nesting(MAX_COMMAND_BYTES // 2 - 20, kind) + b"}",
        b'{"v":1,"x":"' + b"a" * (9 << 20) + b'"}',
    ):
        COUNTS[f"protocol: deep nesting / oversize: {name}"] += 1
        with pytest.raises(EdgepackError):
            DECODERS[name](payload)


topic_parts = st.sampled_from(["devices", "groups", "bundles", "chunks", "operators", "cmd", "state", "events",
                               "index", "sync", "", "+", "#", "edgepack", "x"])  # fmt: skip


@fuzz_settings(500)
@given(parts=st.lists(topic_parts | st.text(max_size=8), max_size=6), prefix=st.booleans())
def test_topic_parser(parts, prefix):
    topics = Topics("edgepack")
    topic = "/".join((["edgepack"] if prefix else []) + parts)
    COUNTS["protocol: topics.parse"] += 1
    match = topics.parse(topic)  # documented: a TopicMatch or None, never an exception
    if match is not None:
        assert match.kind in ("device_cmd", "group_cmd", "state", "events", "index", "chunk", "sync")
