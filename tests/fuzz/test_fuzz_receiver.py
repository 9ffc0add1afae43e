"""Fuzzing the chunk assembler (agent/receiver.py): Transfer.offer in any order with any bytes, then assemble.

A fuzzed run offers a random sequence of chunks — right ones, duplicates, chunks under another chunk's hash,
truncated, extended, bit-flipped, empty, unknown hashes — then every right chunk in a random order. Only
True/False (new/duplicate) or ChunkMismatchError may come back from ``offer``; the assembled file must be
exactly the bundle; the counters must add up. A second test resumes from a partial file whose regions were
fuzzed: a region counts as held exactly when it holds its chunk, whatever else the file holds.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgepack.agent.receiver import PART_FILE, ReceiveCounters, Transfer
from edgepack.errors import EdgepackError
from edgepack.protocol import sha256_hex
from edgepack.transfer import chunk_bundle
from tests.fuzz.common import COUNTS, fuzz_settings, mutated_bytes, tolerate

CHUNK = 256
_counter = itertools.count()


@pytest.fixture(scope="module")
def chunked(world):
    return chunk_bundle(world.bundle_path, CHUNK)


def _directory(tmp_path_factory) -> object:
    return tmp_path_factory.getbasetemp() / f"transfer{next(_counter)}"


@st.composite
def offers(draw: st.DrawFn, chunked) -> list[tuple[str, bytes]]:
    n = len(chunked.index.chunks)
    out = []
    for _ in range(draw(st.integers(0, 3 * n))):
        position = draw(st.integers(0, n - 1))
        sha, data = chunked.index.chunks[position].sha256, chunked.chunk(position)
        how = draw(st.sampled_from(["right", "right", "other hash", "truncated", "extended", "flipped", "empty",
                                    "unknown hash", "random"]))  # fmt: skip
        if how == "other hash":
            sha = chunked.index.chunks[draw(st.integers(0, n - 1))].sha256
        elif how == "truncated":
            data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
        elif how == "extended":
            data = data + draw(st.binary(min_size=1, max_size=8))
        elif how == "flipped":
            data = draw(mutated_bytes(data))
        elif how == "empty":
            data = b""
        elif how == "unknown hash":
            sha = draw(st.sampled_from([sha256_hex(data + b"x"), "0" * 64, "", "zz", sha.upper()]))
        elif how == "random":
            data = draw(st.binary(max_size=2 * CHUNK))
        out.append((sha, data))
    return out


@fuzz_settings(300)
@given(data=st.data())
def test_offers_in_any_order_then_assemble(world, chunked, tmp_path_factory, data):
    counters = ReceiveCounters()
    transfer = Transfer(_directory(tmp_path_factory), chunked.index, counters)
    try:
        for sha, blob in data.draw(offers(chunked)):
            result = tolerate("chunk assembler: offer (fuzzed)", transfer.offer, sha, blob)
            assert result in (True, False, None)
        if data.draw(st.booleans()):  # assembling early is a clean refusal
            early = tolerate("chunk assembler: assemble (maybe incomplete)", transfer.assemble)
            if early is not None:
                assert early.read_bytes() == world.bundle_bytes
                return
            transfer = Transfer(transfer.directory, chunked.index, counters)  # resume after the refusal
        order = data.draw(st.permutations(range(len(chunked.index.chunks))))
        for position in order:
            COUNTS["chunk assembler: offer (right chunk)"] += 1
            transfer.offer(chunked.index.chunks[position].sha256, chunked.chunk(position))
        path = tolerate("chunk assembler: assemble (complete)", transfer.assemble)
        assert path is not None, "every chunk was offered, yet the transfer did not assemble"
        assert path.read_bytes() == world.bundle_bytes
        assert transfer.held_bytes == transfer.total_bytes == len(world.bundle_bytes)
        assert transfer.missing() == []
    finally:
        transfer.close()


@fuzz_settings(200)
@given(data=st.data())
def test_resume_from_a_fuzzed_partial_file(world, chunked, tmp_path_factory, data):
    directory = _directory(tmp_path_factory)
    directory.mkdir(parents=True)
    part = data.draw(mutated_bytes(world.bundle_bytes) | st.binary(max_size=4 * CHUNK))
    (directory / PART_FILE).write_bytes(part)
    transfer = tolerate("chunk assembler: resume from fuzzed partial file", Transfer, directory, chunked.index,
                        ReceiveCounters())  # fmt: skip
    if transfer is None:
        return
    try:
        expected_held = {
            ref.sha256
            for ref in chunked.index.chunks
            if all(
                sha256_hex(world_region(part, p, chunked)) == ref.sha256
                for p, r in enumerate(chunked.index.chunks)
                if r.sha256 == ref.sha256
            )
        }
        assert set(transfer.missing()) == {ref.sha256 for ref in chunked.index.chunks} - expected_held
        for position in range(len(chunked.index.chunks)):
            transfer.offer(chunked.index.chunks[position].sha256, chunked.chunk(position))
        path = transfer.assemble()
        assert path.read_bytes() == world.bundle_bytes
    finally:
        transfer.close()


def world_region(part: bytes, position: int, chunked) -> bytes:
    """What a chunk region of the partial file holds once it is sized to the bundle (zeros past its end)."""
    size = chunked.index.size
    padded = part[:size] + bytes(max(0, size - len(part)))
    start = position * chunked.index.chunk_size
    return padded[start : start + chunked.index.chunks[position].size]


def test_offer_after_close_is_a_clean_refusal(chunked, tmp_path_factory):
    transfer = Transfer(_directory(tmp_path_factory), chunked.index, ReceiveCounters())
    transfer.close()
    COUNTS["chunk assembler: offer after close"] += 1
    with pytest.raises(EdgepackError):
        transfer.offer(chunked.index.chunks[0].sha256, chunked.chunk(0))
