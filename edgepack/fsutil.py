"""Crash-safe file writes (temporary file, fsync, rename, fsync of the directory) and bounded JSON reads.

Every piece of persistent state edgepack writes (trust stores, bundles, the device store, journals) goes
through these functions, so a power cut at any instant leaves either the old or the new file, never a
mix or a torn write. The order is what makes that true on SD cards and eMMC, where a directory entry that
was never synced can vanish at a power cut:

    write the data → fsync the file (and, for a staged directory, each directory in it)
    → rename into place → fsync the directory that holds the new name

``tests/agent/test_fsync_order.py`` checks that order at the syscall level under strace.

:func:`loads_json` is the one JSON reader for untrusted or possibly corrupt bytes (manifests, state files,
journals): Python's ``json`` raises ``RecursionError`` on deeply nested input, which is not a
``ValueError`` and escapes every handler written for bad JSON; and a value nested a little less deeply
parses but makes pydantic or ``json.dumps`` recurse later. Both become a ``ValueError`` here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

MAX_JSON_DEPTH = 64


def fsync_dir(directory: Path) -> None:
    """Make a rename, unlink or new entry in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every directory under ``root`` (deepest first), then ``root`` itself.

    For a staged directory about to be renamed into place: its files must already be synced (the writer
    syncs each as it closes it); this makes the entries naming them durable too.
    """
    for current, _dirs, _files in os.walk(root, topdown=False):
        fsync_dir(Path(current))


def ensure_dir(directory: Path) -> None:
    """``mkdir -p`` that makes every directory it creates durable (fsync of each new one's parent)."""
    directory = Path(directory)
    missing = []
    probe = directory
    while not probe.is_dir():
        missing.append(probe)
        probe = probe.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):
            new.mkdir()
        fsync_dir(new.parent)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces ``path`` atomically when the block ends without error.

    On an exception the temporary file is removed and ``path`` is untouched. The mode is set before the
    fsync, so what the rename publishes is synced whole (data and metadata).
    """
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_writer(path, mode) as fh:
        fh.write(data)


def atomic_write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n", mode)


def file_digest(path: Path, chunk: int = 1 << 20) -> tuple[int, str]:
    """Size and hex sha256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def json_depth(value: Any) -> int:
    """How deeply lists and dicts nest in a parsed JSON value (iterative: no recursion limit to hit)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def loads_json(
    data: bytes | str,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    parse_constant: Callable[[str], Any] | None = None,
) -> Any:
    """``json.loads`` for bytes that may be corrupt or hostile; every failure is a ``ValueError``.

    Refuses invalid UTF-8, nesting deeper than ``max_depth`` (instead of a ``RecursionError``) and, when
    ``parse_constant`` is given, lets it refuse NaN and Infinity.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc}") from exc
    try:
        value = json.loads(text) if parse_constant is None else json.loads(text, parse_constant=parse_constant)
    except RecursionError as exc:
        raise ValueError(f"arrays and objects nest too deeply (at most {max_depth} levels are accepted)") from exc
    depth = json_depth(value)
    if depth > max_depth:
        raise ValueError(f"arrays and objects nest {depth} deep; at most {max_depth} levels are accepted")
    return value


def read_json(path: Path) -> Any:
    """Read a JSON file written by edgepack; a corrupt one raises ``ValueError`` (never ``RecursionError``)."""
    return loads_json(Path(path).read_bytes())
