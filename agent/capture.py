"""Data capture on the device: which requests to keep (the rules) and where (a bounded on-disk ring buffer).

**Rules** (:class:`CaptureRules`, one per model, from ``[capture.models.NAME]`` in ``agent.toml``): of the
requests the ``sample_rate`` lets through, a request is kept when the model's drift is at least
``when_drift`` (rule ``drift``), when its top output score is below ``top_score_below`` (``top_score``:
the smallest over the batch rows of the largest value of the first output), or at random with
``random_share`` (``random``); the first rule that fires names the record. Only the inputs named in
``inputs`` (and the outputs, with ``outputs = true``) are stored; ``stats_only`` stores their per-channel
statistics instead of their values. Nothing is captured unless ``[capture] enabled = true`` and the model
is listed (privacy: off by default, opt-in per input).

**Ring buffer** (:class:`CaptureBuffer`): one file per record, ``r<seq>.npz`` (the format is
``edgepack/capture_record.py``), written like everything on the device (temporary file, fsync, rename,
fsync of the folder), so it survives a restart or a power cut whole or not at all; ``counters.json`` keeps
the next sequence number and what was dropped and uploaded (written at every drop and delete; the
``captured`` count every few records, so a power cut may lose a few of those increments — the sequence
number itself is recovered from the files). Bounded by bytes and by count: a new record drops the
oldest ones until both bounds hold (counted in ``dropped``), and a record larger than the byte bound is
dropped at once. It is written from the field-data thread (``agent/field_data.py``), never on the request
path, so a slow or full disk never blocks inference. Records leave when the operator acknowledged their
upload (``agent/link/capture_upload.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.config import CaptureModelSettings
from edgepack.fsutil import atomic_write_bytes, atomic_write_json, ensure_dir, fsync_dir, read_json

log = logging.getLogger(__name__)

COUNTERS = "counters.json"
COUNTERS_EVERY = 16  # records added between writes of counters.json (drops and deletes write it at once)
_RECORD = re.compile(r"^r(\d{12})\.npz$")
DRIFT_RANK = {"off": 99, "collecting": 0, "ok": 1, "warn": 2, "alarm": 3}


@dataclass(frozen=True)
class StoredRecord:
    seq: int
    path: Path
    size: int


class CaptureBuffer:
    """The bounded on-disk ring buffer of capture records (thread-safe)."""

    def __init__(self, directory: Path, *, max_bytes: int, max_count: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_count = max_count
        self._lock = threading.Lock()
        ensure_dir(self.directory)
        for leftover in self.directory.glob(".*.tmp"):  # a write cut short by a crash
            leftover.unlink(missing_ok=True)
        self._records: dict[int, StoredRecord] = {}
        for path in self.directory.iterdir():
            match = _RECORD.match(path.name)
            if match:
                seq = int(match.group(1))
                self._records[seq] = StoredRecord(seq, path, path.stat().st_size)
        counters = self._read_counters()
        self.next_seq = max([int(counters.get("next_seq", 1)), *(s + 1 for s in self._records)])
        self.dropped = int(counters.get("dropped", 0))
        self.dropped_bytes = int(counters.get("dropped_bytes", 0))
        self.captured = int(counters.get("captured", 0))
        self.uploaded = int(counters.get("uploaded", 0))
        self._sha: dict[int, str] = {}
        self._unsaved = 0
        with self._lock:
            self._enforce(0)

    # --- writing (field-data thread) ---

    def add(self, data: bytes) -> int | None:
        """Store one record; returns its sequence number, or None when it alone exceeds the byte bound."""
        with self._lock:
            seq = self.next_seq
            self.next_seq += 1
            if len(data) > self.max_bytes:
                self.dropped += 1
                self.dropped_bytes += len(data)
                log.warning("capture record of %d bytes exceeds capture.max_bytes (%d): dropped", len(data),
                            self.max_bytes)  # fmt: skip
                self._write_counters()
                return None
            self._enforce(len(data))
            path = self.directory / f"r{seq:012d}.npz"
            atomic_write_bytes(path, data)
            self._records[seq] = StoredRecord(seq, path, len(data))
            self.captured += 1
            self._unsaved += 1
            if self._unsaved >= COUNTERS_EVERY:  # the sequence is recovered from the files; the count can lag
                self._write_counters()
            return seq

    def _enforce(self, incoming: int) -> None:
        """Drop the oldest records until one more of ``incoming`` bytes fits both bounds (lock held)."""
        dropped = 0
        while self._records and (
            len(self._records) + (1 if incoming else 0) > self.max_count or self.bytes + incoming > self.max_bytes
        ):
            oldest = min(self._records)
            record = self._records.pop(oldest)
            self._sha.pop(oldest, None)
            record.path.unlink(missing_ok=True)
            self.dropped += 1
            self.dropped_bytes += record.size
            dropped += 1
        if dropped:
            fsync_dir(self.directory)
            self._write_counters()
            log.info("capture buffer full: dropped the %d oldest record(s)", dropped)

    # --- reading and deleting (uploader thread) ---

    @property
    def bytes(self) -> int:
        return sum(r.size for r in self._records.values())

    def records(self) -> list[StoredRecord]:
        """The records held, oldest first."""
        with self._lock:
            return [self._records[s] for s in sorted(self._records)]

    def read(self, seq: int) -> tuple[bytes, str] | None:
        """A record's bytes and sha256; None when it is gone (dropped meanwhile)."""
        with self._lock:
            record = self._records.get(seq)
        if record is None:
            return None
        try:
            data = record.path.read_bytes()
        except FileNotFoundError:
            return None
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            self._sha[seq] = digest
        return data, digest

    def delete(self, seq: int, sha256: str) -> bool:
        """Delete an uploaded record the operator acknowledged, if it is still the one with ``sha256``."""
        with self._lock:
            record = self._records.get(seq)
            if record is None:
                return False
            known = self._sha.get(seq)
            if known is None:
                with contextlib.suppress(OSError):
                    known = hashlib.sha256(record.path.read_bytes()).hexdigest()
            if known != sha256:
                return False
            del self._records[seq]
            self._sha.pop(seq, None)
            record.path.unlink(missing_ok=True)
            fsync_dir(self.directory)
            self.uploaded += 1
            self._write_counters()
            return True

    def status(self) -> dict[str, int]:
        with self._lock:
            return {
                "records": len(self._records), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "max_count": self.max_count, "captured": self.captured, "uploaded": self.uploaded,
                "dropped": self.dropped, "dropped_bytes": self.dropped_bytes,
            }  # fmt: skip

    def _read_counters(self) -> dict[str, Any]:
        try:
            data = read_json(self.directory / COUNTERS)
        except (OSError, ValueError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("capture counters unreadable (%s); starting them again", exc)
            return {}
        return data if isinstance(data, dict) else {}

    def save(self) -> None:
        """Write the counters now (at shutdown; otherwise every few records and at every drop or delete)."""
        with self._lock:
            self._write_counters()

    def _write_counters(self) -> None:
        self._unsaved = 0
        atomic_write_json(self.directory / COUNTERS, {
            "next_seq": self.next_seq, "dropped": self.dropped, "dropped_bytes": self.dropped_bytes,
            "captured": self.captured, "uploaded": self.uploaded,
        })  # fmt: skip


class CaptureRules:
    """Whether a request is kept, and by which rule (see the module docstring)."""

    def __init__(self, settings: CaptureModelSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random(int.from_bytes(os.urandom(8), "little"))

    def sampled(self) -> bool:
        """The ``sample_rate`` draw (on the request path: one random number)."""
        return self.settings.sample_rate >= 1.0 or self._rng.random() < self.settings.sample_rate

    def pick(self, outputs: Mapping[str, np.ndarray], drift: str | None) -> str | None:
        s = self.settings
        if drift is not None and DRIFT_RANK.get(drift, 0) >= DRIFT_RANK[s.when_drift]:
            return "drift"
        if s.top_score_below is not None:
            score = top_score(outputs)
            if score is not None and score < s.top_score_below:
                return "top_score"
        if s.random_share and self._rng.random() < s.random_share:
            return "random"
        return None


def top_score(outputs: Mapping[str, np.ndarray]) -> float | None:
    """The smallest, over batch rows, of the largest value of the first float output; None without one."""
    for array in outputs.values():
        a = np.asarray(array)
        if a.dtype.kind != "f" or a.size == 0:
            continue
        rows = a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(1, -1)
        return float(np.nanmax(rows, axis=1).min())
    return None
