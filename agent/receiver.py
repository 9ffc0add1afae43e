"""The device's resumable chunk receiver: a bundle arrives as content-addressed chunks, survives restarts.

Layout, under the store's ``incoming/`` (reserved for partial transfers)::

    incoming/BUNDLE/index.json        the chunk index, kept (atomically) once it matched the signed command
    incoming/BUNDLE/bundle.part       the bundle file being filled in: each chunk at its offset
    incoming/BUNDLE/bundle.epk        the complete file (renamed from bundle.part), while it installs

**Each chunk is checked before it is kept, and is its own record.** A chunk's bytes are checked against
the hash they were published under and the size the index gives *before* a byte is written; a writer
thread then writes them at the chunk's offset in ``bundle.part`` (preallocated, so a full disk shows at
once) while the network thread takes the next one. What has arrived is not kept in a second bookkeeping
file that could disagree with the data: on resume, every chunk region of ``bundle.part`` is hashed and
counts as held exactly when it matches its chunk's sha256. A region is therefore either a whole, correct
chunk or missing — a write torn by a crash or a power cut cannot be mistaken for a chunk — and resuming
costs one read of the partial file (about 0.1 s per 50 MB), not a network round. The file is synced every
``SYNC_BYTES`` so a power cut loses little. When every chunk is held, the whole file's sha256 is checked
against the signed command and the file is synced and renamed to ``bundle.epk`` (atomic: rename, then
directory fsync, as ``edgepack.fsutil`` does): that is the one file the installer ever sees.

Why one file and not a file per chunk: a file per chunk costs an fsync and a rename per chunk and then
a second full copy to assemble them, which halves delivery speed on a device for no gain in safety — the
hash check per region gives the same all-or-nothing unit.

**Asking again only for what is missing — why two mechanisms.** Chunks are *retained* messages, one topic
per chunk. A device subscribes to the topics of the chunks it is missing, and only those: after a
disconnect or a restart, subscribing again makes the broker send exactly the missing chunks from its
retained store, without any operator running. That fails only when the broker has lost its retained
messages (restarted without persistence, or expired them); then nothing arrives, and after a quiet spell
the device publishes a ``need`` event listing the missing chunk positions, which the operator side answers
by publishing them again (``fleet/deploy.py``). Re-subscribing costs nothing when it works; the ``need``
makes the broker's memory unnecessary. Neither re-sends a chunk the device holds, so an interruption costs
at most the chunks that were in flight and never arrived.

**Disk quota is checked up front against the index**: a transfer needs room for the bundle file and then
for its extracted copy while it installs, so ``2 × size`` bytes (less what is held already); a bundle
that does not fit is refused before the first chunk is asked for.

The receiver knows nothing of MQTT: the link hands it chunks (:meth:`Transfer.offer`) and asks it what is
missing. Counters (received, duplicate, rejected, resumed bytes) are kept per transfer and for the process.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edgepack.errors import ChunkMismatchError, IndexMismatchError, QuotaExceededError, TransferError
from edgepack.fsutil import atomic_write_bytes, ensure_dir, fsync_dir
from edgepack.protocol import ChunkIndex, InstallCommand, TransferCounters, parse_index, positions_of, sha256_hex

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
PART_FILE = "bundle.part"
ASSEMBLED_FILE = "bundle.epk"
MB = 1 << 20
WRITE_QUEUE = 8  # chunks checked and waiting for the disk; beyond this the network thread waits
SYNC_BYTES = 16 << 20  # the writer syncs the partial file after this many bytes


@dataclass
class ReceiveCounters:
    """Bytes by what became of them. ``received``: new chunks kept; ``duplicate``: chunks already held;
    ``rejected``: chunks refused (bad hash or size); ``resumed``: held on disk when a transfer was opened."""

    resumed_bytes: int = 0
    received_bytes: int = 0
    received_chunks: int = 0
    duplicate_bytes: int = 0
    duplicate_chunks: int = 0
    rejected_bytes: int = 0
    rejected_chunks: int = 0

    def to_message(self) -> TransferCounters:
        return TransferCounters(
            resumed_bytes=self.resumed_bytes,
            received_bytes=self.received_bytes,
            duplicate_bytes=self.duplicate_bytes,
            rejected_bytes=self.rejected_bytes,
        )

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Transfer:
    """One bundle being filled in, in ``bundle.part``.

    :meth:`offer` runs on the network thread: it checks a chunk's size and hash and queues it; a writer
    thread writes it at its offset, so the network keeps flowing while the disk works. The queue is
    bounded, so a slow disk slows the network down (the broker holds the rest) instead of filling memory.
    A chunk counts as held once it is written.
    """

    def __init__(self, directory: Path, index: ChunkIndex, totals: ReceiveCounters) -> None:
        self.directory = directory
        self.index = index
        self.counters = ReceiveCounters()
        self._totals = totals
        self._sizes = {ref.sha256: ref.size for ref in index.chunks}
        self._positions: dict[str, list[int]] = {}
        for position, ref in enumerate(index.chunks):
            self._positions.setdefault(ref.sha256, []).append(position)
        self._held: set[str] = set()
        self._queued: set[str] = set()
        self._write_error: OSError | None = None
        self._changed = threading.Condition()
        self._writes: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=WRITE_QUEUE)
        self._writer: threading.Thread | None = None
        self._unsynced = 0
        ensure_dir(directory)  # durable, so a power cut loses no resumable transfer
        assembled = directory / ASSEMBLED_FILE
        if assembled.exists() and not self.part.exists():  # stopped after assembling, before the install ended
            os.replace(assembled, self.part)
        existed = self.part.exists()
        self._fd: int | None = self._open_part()
        if existed:  # a new file holds nothing (a chunk of zeros would match its preallocated zeros)
            self._load_held()

    @property
    def bundle(self) -> str:
        return self.index.bundle

    @property
    def part(self) -> Path:
        return self.directory / PART_FILE

    @property
    def total_bytes(self) -> int:
        return self.index.size

    @property
    def held_bytes(self) -> int:
        with self._changed:
            return self._weight(self._held)

    @property
    def complete(self) -> bool:
        with self._changed:
            return len(self._held) == len(self._sizes)

    def missing(self) -> list[str]:
        """The hashes of the chunks neither held nor on their way to disk, in index order."""
        with self._changed:
            return [sha for sha in self._positions if sha not in self._held and sha not in self._queued]

    def holds(self, sha256: str) -> bool:
        """Whether chunk ``sha256`` is held or on its way to disk."""
        with self._changed:
            return sha256 in self._held or sha256 in self._queued

    def chunk_bytes(self, sha256: str) -> int:
        """Bytes of the file chunk ``sha256`` fills (a repeated chunk counts at each of its positions)."""
        return self._sizes[sha256] * len(self._positions[sha256])

    def missing_positions(self) -> list[int]:
        return positions_of(self.index, self.missing())

    def offer(self, sha256: str, data: bytes) -> bool:
        """Take a chunk that arrived under ``sha256``; True when it was new, False for a duplicate.

        Raises ChunkMismatchError for a chunk this index does not list or whose bytes do not match.
        """
        size = self._sizes.get(sha256)
        if size is None:
            self._count_rejected(data)
            raise ChunkMismatchError(f"chunk {sha256[:12]}… is not part of bundle {self.bundle[:12]}…")
        with self._changed:
            if sha256 in self._held or sha256 in self._queued:
                self._count("duplicate", len(data))
                return False
        if len(data) != size:
            self._count_rejected(data)
            raise ChunkMismatchError(
                f"chunk {sha256[:12]}… is {len(data)} bytes where the index says {size}; dropped, it will be fetched again"
            )
        actual = sha256_hex(data)
        if actual != sha256:
            self._count_rejected(data)
            raise ChunkMismatchError(
                f"chunk published as {sha256[:12]}… hashes to {actual[:12]}…; dropped, it will be fetched again"
            )
        with self._changed:
            if sha256 in self._held or sha256 in self._queued:  # the same chunk raced in twice
                self._count("duplicate", len(data))
                return False
            if self._fd is None:
                raise TransferError(f"the transfer of bundle {self.bundle[:12]}… is closed")
            self._queued.add(sha256)
            self._count("received", len(data))
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name=f"chunks-{self.bundle[:8]}", daemon=True)
                self._writer.start()
        self._writes.put((sha256, data))
        return True

    def wait(self, timeout: float) -> None:
        """Block until a chunk is written (or :meth:`poke`) or ``timeout`` passes; raise a write error."""
        with self._changed:
            if len(self._held) < len(self._sizes) and self._write_error is None:
                self._changed.wait(timeout)
            self._raise_write_error()

    def poke(self) -> None:
        """Wake a :meth:`wait` (the link calls it when it stops or the job is cancelled)."""
        with self._changed:
            self._changed.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, sync, stop the writer and close the file (idempotent)."""
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join(timeout)
            self._writer = None
        with self._changed:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.fsync(fd)
            os.close(fd)

    def assemble(self) -> Path:
        """Check the complete file against the whole-file hash and make it ``bundle.epk`` (sync + rename)."""
        self.close()
        with self._changed:
            self._raise_write_error()
        if not self.complete:
            raise TransferError(f"bundle {self.bundle[:12]}… is missing {len(self.missing())} chunk(s)")
        whole = hashlib.sha256()
        with open(self.part, "rb") as fh:
            while block := fh.read(1 << 20):
                whole.update(block)
        if whole.hexdigest() != self.index.sha256:
            # every chunk matched its hash, so the index and the command disagree: fetching again cannot help
            raise IndexMismatchError(
                f"the assembled bundle hashes to {whole.hexdigest()[:12]}…, not the {self.index.sha256[:12]}… "
                "its signed command pins"
            )
        out = self.directory / ASSEMBLED_FILE
        os.replace(self.part, out)
        fsync_dir(self.directory)
        return out

    # --- internals -------------------------------------------------------------------------------

    def _open_part(self) -> int:
        fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != self.index.size:
                os.ftruncate(fd, self.index.size)
            os.posix_fallocate(fd, 0, self.index.size)  # claim the space now: a full disk fails here, not later
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.ENOSPC:
                raise QuotaExceededError(
                    f"no room for bundle {self.bundle[:12]}… ({self.index.size / MB:.1f} MB)"
                ) from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate: go on
                raise
            fd = os.open(self.part, os.O_RDWR)
        return fd

    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            sha256, data = item
            try:
                assert self._fd is not None
                for position in self._positions[sha256]:
                    os.pwrite(self._fd, data, position * self.index.chunk_size)
                self._unsynced += len(data)
                if self._unsynced >= SYNC_BYTES:
                    os.fdatasync(self._fd)
                    self._unsynced = 0
            except OSError as exc:  # a failing disk: the worker reports it and ends the job
                log.error("cannot write chunk %s… of bundle %s…: %s", sha256[:12], self.bundle[:12], exc)
                with self._changed:
                    self._queued.discard(sha256)
                    self._write_error = exc
                    self._changed.notify_all()
                continue
            with self._changed:
                self._queued.discard(sha256)
                self._held.add(sha256)
                self._changed.notify_all()

    def _raise_write_error(self) -> None:
        """Caller holds the lock."""
        if self._write_error is not None:
            raise TransferError(f"cannot write bundle {self.bundle[:12]}… to disk: {self._write_error}")

    def _load_held(self) -> None:
        """Hash every chunk region of the partial file: a region holds its chunk exactly when it matches."""
        assert self._fd is not None
        for sha256, positions in self._positions.items():
            size = self._sizes[sha256]
            if all(sha256_hex(os.pread(self._fd, size, p * self.index.chunk_size)) == sha256 for p in positions):
                self._held.add(sha256)
        resumed = self._weight(self._held)
        self.counters.resumed_bytes = resumed
        self._totals.resumed_bytes += resumed
        if resumed:
            log.info("resuming bundle %s…: %d of %d bytes already held", self.bundle[:12], resumed, self.index.size)

    def _weight(self, hashes: set[str]) -> int:
        """Bytes of the file the chunks ``hashes`` cover (a repeated chunk covers each of its positions)."""
        return sum(self._sizes[sha] * len(self._positions[sha]) for sha in hashes)

    def _count(self, what: str, size: int) -> None:
        for counters in (self.counters, self._totals):
            setattr(counters, f"{what}_bytes", getattr(counters, f"{what}_bytes") + size)
            setattr(counters, f"{what}_chunks", getattr(counters, f"{what}_chunks") + 1)

    def _count_rejected(self, data: bytes) -> None:
        with self._changed:
            self._count("rejected", len(data))


class ChunkReceiver:
    """All transfers of one device, under ``incoming``; counters for the whole process in :attr:`counters`."""

    def __init__(
        self,
        incoming: Path,
        *,
        quota_bytes: int | None = None,
        usage: Callable[[], int] | None = None,
    ) -> None:
        self.incoming = Path(incoming)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.quota_bytes = quota_bytes
        self._usage = usage or (lambda: directory_size(self.incoming))
        self.counters = ReceiveCounters()

    def directory(self, bundle: str) -> Path:
        return self.incoming / bundle

    def check_space(self, size: int, bundle: str | None = None) -> None:
        """Refuse (QuotaExceededError) a bundle of ``size`` bytes that would not fit.

        A transfer takes ``size`` for the file and ``size`` again while the installer extracts it; a partial
        file of the same ``bundle`` already on disk (and counted in the usage) is subtracted.
        """
        part = self.directory(bundle) / PART_FILE if bundle else None
        held = part.stat().st_size if part is not None and part.is_file() else 0
        needed = max(0, 2 * size - held)
        free = shutil.disk_usage(self.incoming).free
        if needed > free:
            raise QuotaExceededError(
                f"bundle of {size / MB:.1f} MB needs {needed / MB:.1f} MB more (chunks, then the assembled file "
                f"while it installs); the disk has {free / MB:.1f} MB free"
            )
        if self.quota_bytes is not None:
            used = self._usage()
            if used + needed > self.quota_bytes:
                raise QuotaExceededError(
                    f"bundle of {size / MB:.1f} MB needs {needed / MB:.1f} MB more (chunks, then the assembled file "
                    f"while it installs); the disk quota of {self.quota_bytes / MB:.1f} MB has "
                    f"{max(0, self.quota_bytes - used) / MB:.1f} MB left"
                )

    def saved_index(self, command: InstallCommand) -> ChunkIndex | None:
        """The index kept from an earlier run of this transfer, if it is the one ``command`` pins."""
        path = self.directory(command.bundle) / INDEX_FILE
        if not path.is_file():
            return None
        payload = path.read_bytes()
        if sha256_hex(payload) != command.index_sha256:
            log.info("bundle %s… was being fetched with another chunk index; starting over", command.bundle[:12])
            self.discard(command.bundle)
            return None
        return parse_index(payload)

    def accept_index(self, command: InstallCommand, payload: bytes) -> ChunkIndex:
        """Check a received index against the signed command, check the quota, and keep it."""
        actual = sha256_hex(payload)
        if actual != command.index_sha256:
            raise IndexMismatchError(
                f"chunk index for bundle {command.bundle[:12]}… hashes to {actual[:12]}…, not the "
                f"{command.index_sha256[:12]}… the signed command pins (altered, or from another deploy)"
            )
        index = parse_index(payload)
        for field, want in (("bundle", command.bundle), ("size", command.size), ("sha256", command.sha256)):
            if getattr(index, field) != want:
                raise IndexMismatchError(
                    f"chunk index says {field} {getattr(index, field)!r} where the signed command says {want!r}"
                )
        self.check_space(index.size, index.bundle)
        atomic_write_bytes(self.directory(command.bundle) / INDEX_FILE, payload)
        return index

    def open(self, index: ChunkIndex) -> Transfer:
        """Open (or resume) the transfer of ``index``'s bundle."""
        return Transfer(self.directory(index.bundle), index, self.counters)

    def discard(self, bundle: str) -> None:
        shutil.rmtree(self.directory(bundle), ignore_errors=True)

    def discard_all_but(self, keep: set[str]) -> list[str]:
        """Remove partial transfers no pending command needs (at boot and after each job)."""
        removed = []
        for path in self.incoming.iterdir():
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed


def directory_size(root: Path) -> int:
    """Bytes in the files under ``root`` (0 when it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total
