"""The device's events out: numbered, sent at once when connected, buffered (bounded) while offline.

When the buffer is full the oldest ``progress`` event goes first, then the oldest of any kind, and
:attr:`EventSink.dropped` counts what went (it is in the device state). The buffer is sent, in order, on
every (re)connect. A ``result`` event is also kept by the command book until the broker acknowledged it:
:meth:`EventSink.acknowledged` says which results the broker now holds (see ``book.py``).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from datetime import datetime
from typing import Any

from edgepack.manifest import utc_now
from edgepack.mqtt import MqttClient
from edgepack.protocol import (
    AcceptedEvent,
    NeedEvent,
    ProgressEvent,
    RejectedEvent,
    ResultEvent,
    encode,
    error_code,
)

log = logging.getLogger(__name__)

JSON = "application/json"

AnyEvent = AcceptedEvent | ProgressEvent | NeedEvent | ResultEvent | RejectedEvent


class EventSink:
    """Events of one device on ``topic``."""

    def __init__(self, client: MqttClient, topic: str, device: str, *, limit: int, expiry_s: int) -> None:
        self.client = client
        self.topic = topic
        self.device = device
        self.limit = limit
        self.expiry_s = expiry_s
        self.dropped = 0
        self._lock = threading.Lock()
        self._buffer: deque[AnyEvent] = deque()
        self._seq = itertools.count(1)
        self._results_in_flight: dict[str, Any] = {}  # command id -> paho's MQTTMessageInfo of its result

    def base(self, command_id: str | None = None, at: datetime | None = None) -> dict[str, Any]:
        """The common fields of an event about ``command_id``."""
        return {"device": self.device, "at": at or utc_now(), "command_id": command_id}

    def emit(self, event: AnyEvent) -> None:
        event = event.model_copy(update={"seq": next(self._seq)})
        with self._lock:
            if not self.client.is_connected:
                self._hold(event)
                return
        self._send(event)

    def reject(self, topic: str, exc: BaseException, command_id: str | None = None) -> None:
        """A ``rejected`` event for a message on ``topic`` refused with ``exc``."""
        self.emit(
            RejectedEvent(
                **self.base(command_id), code=error_code(exc), reason=str(exc) or type(exc).__name__, topic=topic
            )
        )

    def flush(self) -> None:
        """Send what was buffered (on connect)."""
        with self._lock:
            held, self._buffer = list(self._buffer), deque()
        for event in held:
            self._send(event)

    @property
    def buffered(self) -> list[AnyEvent]:
        with self._lock:
            return list(self._buffer)

    def _hold(self, event: AnyEvent) -> None:
        """Caller holds the lock."""
        if len(self._buffer) >= self.limit:
            victim = next((e for e in self._buffer if isinstance(e, ProgressEvent)), self._buffer[0])
            self._buffer.remove(victim)
            self.dropped += 1
        self._buffer.append(event)

    def acknowledged(self) -> list[str]:
        """Command ids whose result event the broker acknowledged since the last call."""
        with self._lock:
            done = [cid for cid, info in self._results_in_flight.items() if info.is_published()]
            for cid in done:
                del self._results_in_flight[cid]
        return done

    def _send(self, event: AnyEvent) -> None:
        info = self.client.publish(self.topic, encode(event), expiry_s=self.expiry_s, content_type=JSON)
        if isinstance(event, ResultEvent) and event.command_id:
            with self._lock:
                self._results_in_flight[event.command_id] = info
