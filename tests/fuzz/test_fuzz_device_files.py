"""Fuzzing the files the device reads back from its own disk: ``state.json``, the journals, ``commands.json``.

A power cut, a failing SD card or a hand edit can leave any bytes there. Reading them must never raise
anything but an EdgepackError (the store and the command book quarantine a corrupt file and rebuild what
they can, issue 12 item 6), and what the store then holds must be usable: a StoreState whose models have
string-or-None fields.
"""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from edgepack.agent.link import CommandBook
from edgepack.agent.store import DeviceStore
from tests.fuzz.common import (
    deep_nesting,
    encode_json,
    fuzz_settings,
    json_values,
    mutated_bytes,
    mutated_json,
    tolerate,
)

_counter = itertools.count()

STATE = {"version": 1, "models": {"linear": {"active": "ab" * 32, "previous": None, "highest_version": "1.2.0"}}}
JOURNAL = {"name": "linear", "bundle": "ab" * 32, "version": "1.2.0", "action": "install", "state": "commit",
           "history": [{"state": "verify", "at": "2026-01-01T00:00:00.000+00:00"}], "outcome": None,
           "reason": None}  # fmt: skip
BOOK = {"version": 1, "last_seq": {"linear": 5}, "done": [{"id": "0" * 32, "outcome": "committed"}], "pending": []}

contents = st.one_of(
    st.binary(max_size=512),
    json_values.map(lambda v: encode_json(v, canonical=False)),
    st.sampled_from([deep_nesting(50_000), deep_nesting(50_000, "dict"), b"", b"\xff\xfe", b"null", b"[]"]),
)


def _root(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / f"store{next(_counter)}"
    root.mkdir()
    return root


@fuzz_settings(300)
@given(data=st.data())
def test_state_json(tmp_path_factory, data):
    root = _root(tmp_path_factory)
    blob = data.draw(
        contents
        | mutated_json(STATE).map(lambda v: encode_json(v, canonical=False))
        | mutated_bytes(json.dumps(STATE).encode())
    )
    (root / "state.json").write_bytes(blob)
    store = tolerate("device files: state.json: open store", DeviceStore, root)
    if store is None:
        return
    state = tolerate("device files: state.json: load_state", store.load_state)
    if state is not None:
        for entry in state.models.values():
            for value in (entry.active, entry.previous, entry.highest_version):
                assert value is None or isinstance(value, str)


@fuzz_settings(200)
@given(data=st.data())
def test_journal_files(tmp_path_factory, data):
    root = _root(tmp_path_factory)
    (root / "journal").mkdir()
    blob = data.draw(
        contents
        | mutated_json(JOURNAL).map(lambda v: encode_json(v, canonical=False))
        | mutated_bytes(json.dumps(JOURNAL).encode())
    )
    (root / "journal" / "00000001-linear.json").write_bytes(blob)
    store = tolerate("device files: journal: open store", DeviceStore, root)
    if store is not None:
        tolerate("device files: journal: journals()", store.journals)


@fuzz_settings(300)
@given(data=st.data())
def test_commands_json(tmp_path_factory, data):
    root = _root(tmp_path_factory)
    blob = data.draw(
        contents
        | mutated_json(BOOK).map(lambda v: encode_json(v, canonical=False))
        | mutated_bytes(json.dumps(BOOK).encode())
    )
    (root / "commands.json").write_bytes(blob)
    book = tolerate("device files: commands.json: CommandBook", CommandBook, root / "commands.json")
    if book is not None:
        tolerate("device files: commands.json: pending()", book.pending)
