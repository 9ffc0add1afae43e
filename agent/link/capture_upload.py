"""Upload of captured records over MQTT: asked for by the operator, acknowledged by it, then deleted.

The device never pushes data unasked. The operator (``edgepack fleet capture pull``, ``fleet/capture.py``)
publishes a signed :class:`~edgepack.protocol.CapturePull` on ``devices/ID/capture/ctl``; the device checks
it (schema, recipient, expiry, the trust store's ``command`` role) and sends its records, oldest first, as
:class:`~edgepack.protocol.CaptureChunk` messages on ``devices/ID/capture`` (QoS 1, at most ``window``
records unacknowledged at a time), then a :class:`~edgepack.protocol.CaptureEnd`. The operator stores each
complete record (sha256 checked) and answers a signed :class:`~edgepack.protocol.CaptureAck`; only then does
the device delete it. A retained, signed :class:`~edgepack.protocol.CaptureConfig` on the same topic
turns capture of a model on or off (``FieldData.configure`` decides whether it may). So:

* nothing is lost: a record leaves the ring buffer only when acknowledged by sha256;
* a broker restart or a dropped connection resumes: the operator sends a new pull on reconnect naming the
  chunks it holds of records it has in part (``have``), the device sends the rest; a record sent and not
  acknowledged within ``ack_timeout_s`` is sent again; the operator recognises records it already stored
  (by device, sequence number and sha256) and only acknowledges them again, so nothing is duplicated;
* a broker that is down keeps the data on the device, within the ring buffer's bounds.

The MQTT callbacks only parse and hand over; the sending runs on this module's own thread.
"""

from __future__ import annotations

import base64
import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from edgepack.agent.capture import CaptureBuffer
from edgepack.errors import EdgepackError, MalformedMessageError, WrongRecipientError
from edgepack.mqtt import MqttClient, Received
from edgepack.protocol import (
    CaptureAck,
    CaptureChunk,
    CaptureConfig,
    CaptureEnd,
    CapturePull,
    Topics,
    encode,
    parse_capture_control,
)
from edgepack.trust import TrustStore

log = logging.getLogger(__name__)

JSON = "application/json"


class CaptureUploader:
    """The device's side of the capture upload (see the module docstring)."""

    def __init__(
        self,
        buffer: CaptureBuffer,
        client: MqttClient,
        topics: Topics,
        device: str,
        trust: TrustStore,
        *,
        chunk_size: int = 64 << 10,
        window: int = 4,
        ack_timeout_s: float = 30.0,
        publish_timeout_s: float = 30.0,
        configure: Callable[[str, dict[str, Any] | None, int], bool] | None = None,
    ) -> None:
        self.buffer = buffer
        self.client = client
        self.topics = topics
        self.device = device
        self.trust = trust
        self.chunk_size = chunk_size
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self.configure = configure  # FieldData.configure: an operator's capture config (CaptureConfig)
        self.control_topic = topics.capture_control(device)
        self._pull: CapturePull | None = None
        self._have: dict[int, tuple[str, set[int]]] = {}
        self._sent: dict[int, float] = {}  # seq -> when sent for the current pull
        self._ended = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rejected = 0
        self.sent_records = 0

    def start(self) -> None:
        self.client.subscribe([self.control_topic])
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"edgepack-capture-{self.device}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    # --- MQTT callbacks (network thread) ---------------------------------------------------------

    def on_message(self, message: Received) -> None:
        """A message on ``capture/ctl``: verified and handed to the thread; refused ones are logged."""
        if not message.payload:
            return
        try:
            signed = parse_capture_control(message.payload)
            body = signed.message
            if body.device != self.device:
                raise WrongRecipientError(f"capture {body.kind} for device {body.device}, this is {self.device}")
            self.trust.verify("command", signed.signed_bytes(), signed.trust_signatures(), role="command")
            if isinstance(body, CapturePull) and body.expires_at <= datetime.now(timezone.utc):
                raise MalformedMessageError(f"capture pull {body.id} expired at {body.expires_at.isoformat()}")
        except EdgepackError as exc:
            self.rejected += 1
            log.warning("capture control message refused: %s", exc)
            return
        if isinstance(body, CaptureConfig):
            if self.configure is not None:
                self.configure(body.model, body.settings, body.seq)
            return
        if isinstance(body, CaptureAck):
            for ref in body.records:
                if self.buffer.delete(ref.seq, ref.sha256):
                    log.debug("capture record %d acknowledged and deleted", ref.seq)
                with self._lock:
                    self._sent.pop(ref.seq, None)
        else:
            with self._lock:
                self._pull = body
                self._have = {h.seq: (h.sha256, set(h.chunks)) for h in body.have}
                self._sent = {}
                self._ended = False
            log.info("capture pull %s: uploading %d record(s)", body.id, len(self.buffer.records()))
        self._wake.set()

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._step()
            except EdgepackError as exc:  # the broker went away mid-send: the next pull or timeout resumes
                log.info("capture upload paused: %s", exc)
                time.sleep(0.5)
            except Exception:
                log.exception("capture upload failed; it resumes with the next pull")
                time.sleep(1.0)

    def _step(self) -> None:
        with self._lock:
            pull = self._pull
        if pull is None or not self.client.is_connected:
            return
        if pull.expires_at <= datetime.now(timezone.utc):
            with self._lock:
                self._pull = None
            return
        records = self.buffer.records()
        now = time.monotonic()
        for record in records:
            with self._lock:
                if self._pull is not pull:
                    return  # a newer pull arrived: start over with its ``have``
                in_flight = [s for s, at in self._sent.items() if now - at < self.ack_timeout_s]
                if record.seq in in_flight:
                    continue
                if len(in_flight) >= self.window:
                    break
            if self._send(pull, record.seq):
                with self._lock:
                    self._sent[record.seq] = time.monotonic()
        held = {r.seq for r in self.buffer.records()}
        with self._lock:
            finished = not held and not self._ended and self._pull is pull
            if finished:
                self._ended = True
        if finished:
            status = self.buffer.status()
            end = CaptureEnd(device=self.device, pull=pull.id, held=status["records"], dropped=status["dropped"])
            self.client.publish(self.topics.capture(self.device), encode(end), content_type=JSON)
        elif held:
            time.sleep(0.05)  # waiting for acknowledgements (or their timeout): look again soon
            self._wake.set()

    def _send(self, pull: CapturePull, seq: int) -> bool:
        read = self.buffer.read(seq)
        if read is None:
            return False
        data, sha = read
        count = max(1, math.ceil(len(data) / self.chunk_size))
        with self._lock:
            have_sha, have = self._have.get(seq, ("", set()))
        skip = have if have_sha == sha else set()
        infos = []
        topic = self.topics.capture(self.device)
        for position in range(count):
            if position in skip:
                continue
            piece = data[position * self.chunk_size : (position + 1) * self.chunk_size]
            chunk = CaptureChunk(
                device=self.device, pull=pull.id, seq=seq, sha256=sha, size=len(data), chunk_size=self.chunk_size,
                position=position, count=count, data=base64.b64encode(piece).decode("ascii"),
            )  # fmt: skip
            infos.append(self.client.publish(topic, encode(chunk), content_type=JSON))
        self.client.wait_published(infos, self.publish_timeout_s)
        self.sent_records += 1
        return True
