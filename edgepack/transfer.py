"""Cutting a bundle file into content-addressed chunks: the chunk index and the chunks the operator publishes.

A bundle of ``size`` bytes becomes ``ceil(size / chunk_size)`` chunks; every chunk but the last is
``chunk_size`` bytes. Each chunk is named by the sha256 of its bytes and published once, retained, on
``{prefix}/chunks/{sha256}``; the :class:`~edgepack.protocol.ChunkIndex` lists them in order with their sizes
and pins the whole file by sha256. Because a chunk's topic is its hash, a chunk that two bundles share
(fixed-size cutting keeps an unchanged prefix identical) is stored once by the broker, and a device checks
each chunk against the name it arrived under before it keeps it.

This module is the publisher's side (the device's is ``edgepack.agent.receiver``)::

    chunked = chunk_bundle(Path("digits.epk"), chunk_size=256 * 1024)
    chunked.index_bytes                       # publish on topics.index(chunked.bundle)
    for position, ref, data in chunked.iter_chunks():
        ...                                   # publish data on topics.chunk(ref.sha256)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgepack.bundle import read_info
from edgepack.errors import ConfigError
from edgepack.manifest import Manifest
from edgepack.protocol import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MIN_CHUNK_SIZE,
    ChunkIndex,
    ChunkRef,
    sha256_hex,
)


@dataclass(frozen=True)
class ChunkedBundle:
    """A bundle file and its chunk index, ready to publish."""

    path: Path
    manifest: Manifest
    index: ChunkIndex
    index_bytes: bytes

    @property
    def bundle(self) -> str:
        """The bundle's digest (sha256 of its canonical manifest), as the device store names it."""
        return self.index.bundle

    @property
    def index_sha256(self) -> str:
        return sha256_hex(self.index_bytes)

    def chunk(self, position: int) -> bytes:
        """The bytes of chunk ``position`` (read from the file, not kept in memory)."""
        ref = self.index.chunks[position]
        with open(self.path, "rb") as fh:
            fh.seek(position * self.index.chunk_size)
            data = fh.read(ref.size)
        if len(data) != ref.size or sha256_hex(data) != ref.sha256:
            raise ConfigError(f"{self.path} changed on disk since it was chunked; deploy it again")
        return data

    def iter_chunks(self) -> Iterator[tuple[int, ChunkRef, bytes]]:
        """Every chunk in order, each distinct hash once (a repeated chunk is published only once)."""
        seen: set[str] = set()
        with open(self.path, "rb") as fh:
            for position, ref in enumerate(self.index.chunks):
                data = fh.read(ref.size)
                if ref.sha256 in seen:
                    continue
                seen.add(ref.sha256)
                yield position, ref, data


def chunk_bundle(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkedBundle:
    """Read the bundle's head (not verified: the device verifies) and cut the file into chunks."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ConfigError(f"chunk size {chunk_size} must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes")
    path = Path(path)
    manifest = read_info(path).manifest
    size = path.stat().st_size
    if size > MAX_CHUNKS * chunk_size:
        raise ConfigError(
            f"{path.name} is {size} bytes: more than {MAX_CHUNKS} chunks of {chunk_size}; use a larger --chunk-size"
        )
    whole = hashlib.sha256()
    chunks = []
    with open(path, "rb") as fh:
        while data := fh.read(chunk_size):
            whole.update(data)
            chunks.append(ChunkRef(sha256=sha256_hex(data), size=len(data)))
    index = ChunkIndex(
        bundle=sha256_hex(manifest.to_bytes()),
        size=size,
        sha256=whole.hexdigest(),
        chunk_size=chunk_size,
        chunks=chunks,
    )
    return ChunkedBundle(path, manifest, index, index.to_bytes())
