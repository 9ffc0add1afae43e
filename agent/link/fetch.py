"""Fetching a bundle over MQTT: its chunk index, then its missing chunks, paced, asked again, or given up.

**What is asked for, and how fast.** The link subscribes to the index topic, then to the topics of the
missing chunks, at most ``fetch_window`` at a time: each chunk that arrives is unsubscribed and the next
missing one subscribed. The window bounds what the broker queues for the device (memory, and how long a
command published meanwhile waits behind chunks). ``max_rate`` is kept here too, on the worker side: the
next chunk is asked for only when the rate allows (:class:`Pacer`). Nothing ever sleeps on paho's network
thread — it only checks a chunk's hash and hands it to the writer — so keepalives, PUBACKs and commands
flow at any rate. (Sleeping in the message callback, as a throttle, stalls the whole connection: at a low
rate one sleep outlasts the keepalive and the broker drops the device.)

**Asking again** (:class:`NeedTimer`). While something asked for is outstanding and nothing arrives for
``stall_s`` (× a random 1–1.5, so that a fleet stalled by one broker hiccup does not ask in lockstep), the
link publishes a ``need`` — the positions of the chunks it *asked for* that have not arrived (or
``index: true``), never the rest of the missing ones: those come from the broker's retained store when the
window reaches them, and an operator answers a need by publishing each named chunk to every device
subscribed to it, so a long list multiplies the broker's load (measured: 15 bundle copies of ingress on a
1,000-device rollout) — then again after 2×, 4×, … up to ``need_max_s``; anything arriving starts over.
The first time in a quiet spell it does not ask the operator at all: it **subscribes again** to the first
chunk outstanding, which makes the broker send its retained copy again, to this device alone and with no
new upload (a broker that is merely slow, or that dropped a queued message, holds it still); only when that
brings nothing either, or the broker's copy was refused for its hash, is a ``need`` published.
After ``max_unanswered_needs`` needs in a row answered by nothing, the transfer cannot progress — its chunks are gone from the broker and nobody
republishes them — and it ends as failed (``stalled``) with a reason naming the bundle and what is missing.
The job's deadline and expiry (``jobs.py``) are checked on every turn as well.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable

from edgepack.agent.config import LinkSettings
from edgepack.agent.link.events import EventSink
from edgepack.agent.link.jobs import Job, JobState
from edgepack.agent.receiver import ChunkReceiver, Transfer
from edgepack.errors import ChunkMismatchError, IndexMismatchError, TransferStalledError
from edgepack.mqtt import MqttClient
from edgepack.protocol import (
    MAX_NEED_CHUNKS,
    ChunkIndex,
    InstallCommand,
    NeedEvent,
    ProgressEvent,
    Topics,
    TransferStatus,
    sha256_hex,
)

log = logging.getLogger(__name__)

TICK_S = 0.2  # the worker looks at its job at least this often
# a download progress event also waits for this share of the bundle more (≤ 20 per transfer: at 1,000
# devices, one every progress_interval_s each was most of the broker's per-device ingress)
PROGRESS_STEP = 0.05


class Pacer:
    """A byte rate kept by spacing requests: :meth:`take` books ``size`` bytes, :meth:`wait_s` says when the
    next request may go (0: now). No rate: always now."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self._next = 0.0

    def wait_s(self, now: float) -> float:
        return max(0.0, self._next - now) if self.rate else 0.0

    def take(self, size: int, now: float) -> None:
        if self.rate:
            self._next = max(self._next, now) + size / self.rate


class NeedTimer:
    """When to ask again: after ``stall_s`` with something outstanding and nothing arriving (counted from the
    last reconnect too), then at doubling intervals up to ``need_max_s``; any progress starts over and
    clears :attr:`unanswered`."""

    def __init__(self, options: LinkSettings, connected_at: Callable[[], float]) -> None:
        self.options = options
        self._connected_at = connected_at
        self._quiet_since = time.monotonic()
        self._delay = self._first_delay()
        self._seen_connect = connected_at()
        self.unanswered = 0
        self.resubscribed = False  # the first step of a quiet spell was taken: subscribe again, not a need

    def due(self, progressed: bool, waiting: bool = True) -> bool:
        now = time.monotonic()
        connected_at = self._connected_at()
        if progressed:
            self.unanswered = 0
            self.resubscribed = False
        if progressed or not waiting or connected_at != self._seen_connect:
            self._seen_connect = connected_at
            self._quiet_since, self._delay = now, self._first_delay()
            return False
        if now - self._quiet_since < self._delay:
            return False
        self._quiet_since = now
        self._delay = min(self._delay * 2, max(self.options.need_max_s, self.options.stall_s))
        return True

    def _first_delay(self) -> float:
        return self.options.stall_s * random.uniform(1.0, 1.5)  # jitter, not a secret


class Fetcher:
    """The index and chunk side of the link: network-thread callbacks and the worker's fetch loops."""

    def __init__(
        self,
        client: MqttClient,
        topics: Topics,
        receiver: ChunkReceiver,
        events: EventSink,
        options: LinkSettings,
        connected_at: Callable[[], float],
    ) -> None:
        self.client = client
        self.topics = topics
        self.receiver = receiver
        self.events = events
        self.options = options
        self._connected_at = connected_at
        self._cv = threading.Condition()
        self._index_topic: str | None = None
        self._index_payloads: deque[bytes] = deque(maxlen=4)
        self._transfer: Transfer | None = None
        self._wanted: deque[str] = deque()  # missing, not asked for yet, in index order
        self._asked: set[str] = set()  # subscribed, not arrived yet
        self._refused: set[str] = set()  # asked for, and a copy that did not match its hash arrived
        self._asks = 0
        self.pacer = Pacer(options.max_rate)

    # --- network thread --------------------------------------------------------------------------

    def on_index(self, topic: str, payload: bytes) -> None:
        with self._cv:
            if topic != self._index_topic:
                return
            self._index_payloads.append(payload)
            self._cv.notify_all()

    def on_chunk(self, sha256: str, topic: str, payload: bytes) -> None:
        """Check and queue a chunk (raises ChunkMismatchError for a bad one: it stays asked for)."""
        with self._cv:
            transfer = self._transfer
        if transfer is None:
            return
        try:
            transfer.offer(sha256, payload)
        except ChunkMismatchError:
            with self._cv:
                self._refused.add(sha256)  # the broker's copy is bad: subscribing again would bring it again
            raise
        with self._cv:
            self._asked.discard(sha256)
        self.client.unsubscribe([topic])
        self._refill()

    # --- worker ----------------------------------------------------------------------------------

    def status(self, job: Job | None) -> TransferStatus | None:
        with self._cv:
            transfer = self._transfer
        if transfer is None or job is None:
            return None
        return TransferStatus(
            command_id=job.id, bundle=transfer.bundle, held_bytes=transfer.held_bytes, total_bytes=transfer.total_bytes
        )

    def fetch_index(self, job: Job, command: InstallCommand) -> ChunkIndex:
        topic = self.topics.index(command.bundle)
        with self._cv:
            self._index_topic = topic
            self._index_payloads.clear()
        self.client.subscribe([topic])
        self.events.emit(
            ProgressEvent(
                **self.events.base(command.id), phase="index", bundle=command.bundle, total_bytes=command.size
            )
        )
        waiter = NeedTimer(self.options, self._connected_at)
        try:
            while True:
                job.check()
                with self._cv:
                    if not self._index_payloads:
                        self._cv.wait(TICK_S)
                    data = self._index_payloads.popleft() if self._index_payloads else None
                if data is not None:
                    if sha256_hex(data) != command.index_sha256:
                        self.events.reject(
                            topic,
                            IndexMismatchError(
                                f"chunk index for bundle {command.bundle[:12]}… does not match the hash its signed "
                                "command pins (altered, or from another deploy); waiting for the right one"
                            ),
                            command.id,
                        )
                        continue
                    return self.receiver.accept_index(command, data)
                if waiter.due(progressed=False) and self.client.is_connected:
                    if waiter.unanswered >= self.options.max_unanswered_needs:
                        raise TransferStalledError(
                            f"the chunk index of {_name(command)} never arrived on {topic} after "
                            f"{waiter.unanswered} requests: the broker no longer holds it (cleared or expired, or "
                            f"larger than this device's {self.options.max_packet_size}-byte packet limit) and nobody "
                            "published it again — deploy the bundle again"
                        )
                    waiter.unanswered += 1
                    self.events.emit(NeedEvent(**self.events.base(command.id), bundle=command.bundle, index=True))
        finally:
            with self._cv:
                self._index_topic = None
            self.client.unsubscribe([topic])

    def fetch_chunks(self, job: Job, transfer: Transfer) -> None:
        command = job.command
        assert isinstance(command, InstallCommand)
        with self._cv:
            self._transfer = transfer
            self._wanted = deque(transfer.missing())
            self._asked, self._refused = set(), set()
        job.set_state(JobState.DOWNLOAD)
        waiter = NeedTimer(self.options, self._connected_at)
        last_held, last_asks, last_progress, reported = -1, -1, 0.0, -1
        try:
            while not transfer.complete:
                job.check()
                self._refill()
                pace = self.pacer.wait_s(time.monotonic())
                transfer.wait(min(TICK_S, max(0.01, pace)) if pace else TICK_S)  # a written chunk wakes it earlier
                held = transfer.held_bytes
                now = time.monotonic()
                with self._cv:
                    asks, waiting = self._asks, bool(self._asked)
                arrived = held != last_held
                step = held - reported >= transfer.total_bytes * PROGRESS_STEP or transfer.complete
                if arrived and step and now - last_progress >= self.options.progress_interval_s:
                    self.events.emit(
                        ProgressEvent(
                            **self.events.base(command.id),
                            phase="download",
                            bundle=transfer.bundle,
                            held_bytes=held,
                            total_bytes=transfer.total_bytes,
                        )
                    )
                    last_progress, reported = now, held
                progressed = arrived or asks != last_asks
                last_held, last_asks = held, asks
                if waiter.due(progressed, waiting) and self.client.is_connected:
                    if not waiter.resubscribed:
                        waiter.resubscribed = True
                        if self._resubscribe(transfer):
                            continue
                    if waiter.unanswered >= self.options.max_unanswered_needs:
                        positions = transfer.missing_positions()
                        raise TransferStalledError(self._stalled(command, transfer, positions, waiter.unanswered))
                    waiter.unanswered += 1
                    outstanding = self._outstanding(transfer)
                    log.info("nothing arrived for a while; asking again for %d chunk(s)", len(outstanding))
                    self.events.emit(
                        NeedEvent(
                            **self.events.base(command.id), bundle=transfer.bundle, chunks=outstanding[:MAX_NEED_CHUNKS]
                        )
                    )
        finally:
            with self._cv:
                self._transfer = None
                asked, self._asked, self._wanted = self._asked, set(), deque()
            self.client.unsubscribe([self.topics.chunk(sha) for sha in asked])

    # --- internals -------------------------------------------------------------------------------

    def _resubscribe(self, transfer: Transfer) -> bool:
        """Subscribe again to the first chunk asked for and not arrived (in index order): the broker sends its
        retained copy anew (unsubscribing first: an MQTT 5 subscription that exists gets no retained copy,
        retain handling 1). One chunk, not the window: on a broker that is merely slow the window is still
        queued for this device, and a second copy of all of it would add the very load that stalled it
        (measured: 3 × bundle of egress per device at 1,000 devices). Not a chunk whose copy from the broker
        was refused (bad hash). False when there was none to do."""
        with self._cv:
            candidates = self._asked - self._refused
        first = next((ref.sha256 for ref in transfer.index.chunks if ref.sha256 in candidates), None)
        if first is None:
            return False
        topics = [self.topics.chunk(first)]
        log.info("nothing arrived for a while; subscribing again to chunk %s…", first[:12])
        self.client.unsubscribe(topics)
        self.client.subscribe(topics)
        return True

    def _outstanding(self, transfer: Transfer) -> list[int]:
        """Positions of the chunks asked for (subscribed) that have not arrived, in index order."""
        with self._cv:
            asked = set(self._asked)
        chunks = transfer.index.chunks
        return [i for i, ref in enumerate(chunks) if ref.sha256 in asked and not transfer.holds(ref.sha256)]

    def _refill(self) -> None:
        """Ask for more missing chunks while the window has room and the rate allows (any thread)."""
        batch: list[str] = []
        with self._cv:
            transfer = self._transfer
            if transfer is None:
                return
            now = time.monotonic()
            while self._wanted and len(self._asked) + len(batch) < self.options.fetch_window:
                sha = self._wanted[0]
                if transfer.holds(sha):
                    self._wanted.popleft()
                    continue
                if self.pacer.wait_s(now) > 0:
                    break
                self._wanted.popleft()
                self.pacer.take(transfer.chunk_bytes(sha), now)
                batch.append(sha)
            self._asked.update(batch)
            if batch:
                self._asks += 1
        if batch:
            self.client.subscribe([self.topics.chunk(sha) for sha in batch])

    @staticmethod
    def _stalled(command: InstallCommand, transfer: Transfer, positions: list[int], needs: int) -> str:
        missing_bytes = transfer.total_bytes - transfer.held_bytes
        shown = ", ".join(map(str, positions[:8])) + ("…" if len(positions) > 8 else "")
        return (
            f"the transfer of {_name(command)} cannot progress: {len(positions)} of {len(transfer.index.chunks)} "
            f"chunks ({missing_bytes} of {transfer.total_bytes} bytes; positions {shown}) never arrived after "
            f"{needs} requests — the broker no longer holds them (cleared or expired) and nobody published them "
            "again; deploy the bundle again or run `edgepack serve-bundles`"
        )


def _name(command: InstallCommand) -> str:
    return f"bundle {command.model} {command.version} ({command.bundle[:12]}…)"
