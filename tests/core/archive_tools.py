"""Helpers for tests that take bundles apart and put altered ones together."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from edgepack.bundle import BLOCK, canonical_header


@dataclass
class Member:
    name: str
    header: bytes
    data: bytes


def read_members(path: Path) -> list[Member]:
    raw = Path(path).read_bytes()
    members, offset = [], 0
    while raw[offset : offset + BLOCK] != bytes(BLOCK):
        header = raw[offset : offset + BLOCK]
        info = tarfile.TarInfo.frombuf(header, "utf-8", "strict")
        start = offset + BLOCK
        members.append(Member(info.name, header, raw[start : start + info.size]))
        offset = start + info.size + (-info.size % BLOCK)
    return members


def write_members(path: Path, members: list[Member]) -> None:
    out = bytearray()
    for m in members:
        out += m.header + m.data + bytes(-len(m.data) % BLOCK)
    out += bytes(2 * BLOCK)
    Path(path).write_bytes(bytes(out))


def member(name: str, data: bytes) -> Member:
    return Member(name, canonical_header(name, len(data)), data)


def raw_member(info: tarfile.TarInfo, data: bytes = b"") -> Member:
    info.size = len(data)
    return Member(info.name, info.tobuf(format=tarfile.USTAR_FORMAT), data)


def data_offset(path: Path, name: str) -> int:
    raw = Path(path).read_bytes()
    offset = 0
    while True:
        info = tarfile.TarInfo.frombuf(raw[offset : offset + BLOCK], "utf-8", "strict")
        if info.name == name:
            return offset + BLOCK
        offset += BLOCK + info.size + (-info.size % BLOCK)
