"""The operator's side of data capture: pull a device's captured records into calibration files.

``edgepack fleet capture pull --device ID -o DIR --key KEY`` runs :func:`pull_captures`: it subscribes to
the device's ``capture`` topic, publishes a signed :class:`~edgepack.protocol.CapturePull` (again after
every reconnect, naming the chunks it holds of records it has in part), puts each record together, checks
its sha256, writes it, and only then publishes a signed :class:`~edgepack.protocol.CaptureAck` so the
device deletes it (the device side and the guarantees: ``agent/link/capture_upload.py``). It returns when
the device says its buffer is empty (:class:`~edgepack.protocol.CaptureEnd`: everything was acknowledged),
or at ``timeout`` (``complete`` false: pull again to go on).

What lands in ``DIR`` (one file per record, named ``DEVICE-SEQ-SHA12``, so a record sent twice is
recognised and written once)::

    DIR/MODEL/DEVICE-000000000042-3f2a9c01b7e4.npz          inputs, keyed by input name, [1, ...] each
    DIR/MODEL/outputs/DEVICE-000000000042-3f2a9c01b7e4.npz  outputs (when the device captures them)
    DIR/MODEL/stats/DEVICE-000000000042-3f2a9c01b7e4.json   a stats-only record: meta and statistics

:func:`send_capture_config` (``edgepack fleet capture set``, ``edgepack deploy --capture``) turns capture of a
model on a device on or off by a retained, signed :class:`~edgepack.protocol.CaptureConfig`.

``edgepack compile --calibration DIR/MODEL`` reads the folder as it is (``edgepack/datasets.py``: a folder
of ``.npz`` keyed by input name; sub-folders are not read).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.capture_record import CaptureRecord
from edgepack.errors import ConfigError, EdgepackError
from edgepack.fsutil import atomic_writer, ensure_dir
from edgepack.keys import SigningKey
from edgepack.manifest import utc_now
from edgepack.mqtt import MqttClient, MqttOptions, Received
from edgepack.protocol import (
    NAME_RE,
    CaptureAck,
    CaptureChunk,
    CaptureConfig,
    CaptureEnd,
    CaptureHave,
    CapturePull,
    CaptureRecordRef,
    CommandTarget,
    Topics,
    encode,
    new_command_fields,
    parse_capture_message,
    sign_capture_control,
)

log = logging.getLogger(__name__)

PULL_TTL = timedelta(minutes=30)
REPEAT_S = 5.0  # no message from the device for this long: publish the pull again
MAX_HAVE = 16  # records held in part named in a pull (the device has at most a few in flight), bounding its size
JSON = "application/json"


@dataclass
class PullReport:
    device: str
    written: list[Path] = field(default_factory=list)  # input files (what --calibration reads)
    records: int = 0
    duplicates: int = 0  # records received again (already stored): acknowledged again, not written
    bad: int = 0  # records whose sha256 did not match (dropped; the device sends them again)
    held: int | None = None  # what the device said it still holds at the end
    dropped_on_device: int | None = None
    complete: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "device": self.device, "records": self.records, "duplicates": self.duplicates, "bad": self.bad,
            "held": self.held, "dropped_on_device": self.dropped_on_device, "complete": self.complete,
            "written": [str(p) for p in self.written],
        }  # fmt: skip


@dataclass
class _Partial:
    sha256: str
    size: int
    count: int
    chunk_size: int
    chunks: dict[int, bytes] = field(default_factory=dict)


class CapturePuller:
    """One pull from one device (see the module docstring); ``run`` blocks until done or ``timeout``."""

    def __init__(
        self, options: MqttOptions, device: str, out_dir: Path, keys: Sequence[SigningKey], *, prefix: str = "edgepack"
    ) -> None:
        if not NAME_RE.match(device):
            raise ConfigError(f"{device!r} is not a device id (letters, digits, '._=:-', at most 128)")
        if not keys:
            raise ConfigError("pulling captures needs a key with the trust store's 'command' role (--key KEY)")
        self.device = device
        self.out_dir = Path(out_dir)
        self.keys = list(keys)
        self.topics = Topics(prefix)
        self.report = PullReport(device)
        self._partial: dict[int, _Partial] = {}
        self._pull_id = ""
        self._pull_ids: set[str] = set()  # an end for an earlier pull of ours counts too (a pull lost in a restart)
        self._ended = threading.Event()
        self._activity = time.monotonic()
        self._lock = threading.Lock()
        self.client = MqttClient(options, on_message=self._on_message, on_connect=self._on_connect)

    def run(self, timeout: float = 120.0, connect_timeout: float = 10.0) -> PullReport:
        ensure_dir(self.out_dir)
        self.client.subscribe([self.topics.capture(self.device)])
        self.client.connect(connect_timeout)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._ended.wait(0.2):
                    with self._lock:  # the device's buffer was empty: a record held in part is gone from it
                        for seq in self._partial:
                            log.warning("capture record %d of %s was dropped on the device before it arrived whole",
                                        seq, self.device)  # fmt: skip
                        self._partial.clear()
                    self.report.complete = True
                    break
                if self.client.is_connected and time.monotonic() - self._activity > REPEAT_S:
                    self._send_pull()  # nothing heard: the pull (or the device's answer) was lost, ask again
        finally:
            self.client.stop()
        return self.report

    # --- MQTT (network thread) -------------------------------------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        self._send_pull()

    def _send_pull(self) -> None:
        with self._lock:
            have = [CaptureHave(seq=seq, sha256=p.sha256, chunks=sorted(p.chunks)) for seq, p in self._partial.items()]
            self._pull_id = uuid.uuid4().hex
            self._pull_ids.add(self._pull_id)
            self._ended.clear()
            self._activity = time.monotonic()
            now = utc_now()
            pull = CapturePull(id=self._pull_id, device=self.device, issued_at=now, expires_at=now + PULL_TTL,
                               have=have[-MAX_HAVE:])  # fmt: skip
        self.client.publish(self.topics.capture_control(self.device), encode(sign_capture_control(pull, self.keys)),
                            content_type=JSON)  # fmt: skip

    def _on_message(self, message: Received) -> None:
        try:
            body = parse_capture_message(message.payload)
        except EdgepackError as exc:
            log.warning("capture message from %s refused: %s", self.device, exc)
            return
        if body.device != self.device:
            return
        self._activity = time.monotonic()
        if isinstance(body, CaptureEnd):
            if body.pull in self._pull_ids:
                self.report.held, self.report.dropped_on_device = body.held, body.dropped
                self._ended.set()
            return
        self._chunk(body)

    def _chunk(self, chunk: CaptureChunk) -> None:
        with self._lock:
            partial = self._partial.get(chunk.seq)
            if partial is None or partial.sha256 != chunk.sha256:
                partial = _Partial(chunk.sha256, chunk.size, chunk.count, chunk.chunk_size)
                self._partial[chunk.seq] = partial
            try:
                partial.chunks[chunk.position] = base64.b64decode(chunk.data, validate=True)
            except ValueError:
                log.warning("capture chunk %d/%d of record %d is not base64; dropped", chunk.position, chunk.count,
                            chunk.seq)  # fmt: skip
                return
            if len(partial.chunks) < partial.count:
                return
            del self._partial[chunk.seq]
        data = b"".join(partial.chunks[i] for i in range(partial.count))
        if len(data) != partial.size or hashlib.sha256(data).hexdigest() != partial.sha256:
            self.report.bad += 1
            log.warning("capture record %d of %s does not match its sha256; waiting for it again", chunk.seq,
                        self.device)  # fmt: skip
            return
        try:
            self._store(chunk.seq, partial.sha256, data)
        except (EdgepackError, OSError) as exc:
            log.error("cannot store capture record %d of %s: %s (not acknowledged)", chunk.seq, self.device, exc)
            return
        ack = CaptureAck(id=uuid.uuid4().hex, device=self.device, issued_at=utc_now(),
                         records=[CaptureRecordRef(seq=chunk.seq, sha256=partial.sha256)])  # fmt: skip
        self.client.publish(self.topics.capture_control(self.device), encode(sign_capture_control(ack, self.keys)),
                            content_type=JSON)  # fmt: skip

    # --- files -----------------------------------------------------------------------------------

    def _store(self, seq: int, sha256: str, data: bytes) -> None:
        record = CaptureRecord.from_bytes(data)
        model = record.model if NAME_RE.match(record.model) else "unknown-model"
        stem = f"{self.device}-{seq:012d}-{sha256[:12]}"
        folder = self.out_dir / model
        if record.meta.get("stats_only"):
            target = folder / "stats" / f"{stem}.json"
        else:
            target = folder / f"{stem}.npz" if record.inputs else folder / "outputs" / f"{stem}.npz"
        if target.exists():
            self.report.duplicates += 1
            return
        if record.meta.get("stats_only"):
            _write(target, json.dumps(record.meta, indent=1, sort_keys=True).encode())
        else:
            if record.outputs and record.inputs:
                _write_npz(folder / "outputs" / f"{stem}.npz", record.outputs)
            arrays = record.inputs or record.outputs
            _write_npz(target, arrays)  # last: its presence means the record is stored whole
            if record.inputs:
                self.report.written.append(target)
        self.report.records += 1


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # one sample per record: a sample axis in front, as edgepack/datasets.py reads an [S, ...] array
    with atomic_writer(path) as fh:
        np.savez(fh, **{name: np.asarray(a)[None] for name, a in arrays.items()})


def _write(path: Path, data: bytes) -> None:
    with atomic_writer(path) as fh:
        fh.write(data)


def pull_captures(
    options: MqttOptions,
    device: str,
    out_dir: Path,
    keys: Sequence[SigningKey],
    *,
    prefix: str = "edgepack",
    timeout: float = 120.0,
) -> PullReport:
    """Pull every record ``device`` holds into ``out_dir`` (see the module docstring)."""
    return CapturePuller(options, device, out_dir, keys, prefix=prefix).run(timeout)


def send_capture_config(
    options: MqttOptions,
    device: str,
    model: str,
    settings: dict[str, Any] | None,
    keys: Sequence[SigningKey],
    *,
    prefix: str = "edgepack",
    timeout: float = 30.0,
) -> CaptureConfig:
    """Publish, retained, a signed config that turns capture of ``model`` on ``device`` on (``settings``: the
    fields of ``[capture.models.NAME]``) or off (None). The device honours it only where its own
    ``[capture] enabled`` is true and its ``agent.toml`` does not set that model (``docs/capture.md``)."""
    if not NAME_RE.match(device):
        raise ConfigError(f"{device!r} is not a device id (letters, digits, '._=:-', at most 128)")
    if not keys:
        raise ConfigError("a capture config needs a key with the trust store's 'command' role (--key KEY)")
    fields = new_command_fields(CommandTarget(device=device), ttl=None)
    config = CaptureConfig(id=fields["id"], device=device, issued_at=fields["issued_at"], seq=fields["seq"],
                           model=model, settings=settings)  # fmt: skip
    topics = Topics(prefix)
    client = MqttClient(options)
    client.connect(timeout)
    try:
        info = client.publish(topics.capture_control(device), encode(sign_capture_control(config, keys)),
                              retain=True, content_type=JSON)  # fmt: skip
        client.wait_published([info], timeout)
    finally:
        client.stop()
    return config
