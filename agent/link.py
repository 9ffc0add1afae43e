"""The agent's MQTT link: commands in, bundles in as chunks, state and events out — never in the way of serving.

The link is optional and asynchronous: the device serves its local API from its store whatever the broker
does. What it does, in order of a command's life:

1. **Receive** on ``devices/ID/cmd`` and ``groups/G/cmd`` (G from the labels, see
   :func:`edgepack.protocol.groups_from_labels`). Each message is validated — JSON and schema, known
   action, addressed to this device or one of its groups, signed by the trust store's ``command`` role, not
   replayed, not older than one already accepted for the same model, not expired. Anything refused is
   reported as a ``rejected`` event naming the reason (code + sentence) and changes nothing.
2. **Accept**: :class:`CommandBook` persists the command (atomically) *before* it runs, so a crash resumes
   it and a replay of it is refused. An install supersedes a pending install of the same model.
3. **Fetch** on a worker thread: the chunk index (checked against the hash the signed command pins), the
   disk quota, then the missing chunks (see ``agent/receiver.py`` for why re-subscribing to retained chunks
   and a ``need`` event together make transfers resumable). Progress events on the way.
4. **Install** the assembled file through ``DeviceAgent.install`` — the same state machine as the CLI, on
   the worker thread, so the API keeps serving — and publish the ``result`` event and the new state.

Connection handling (paho's, through :mod:`edgepack.mqtt`): reconnect with backoff; a retained ``state``
with a last will that marks the device offline, republished after every reconnect; events buffered while
offline (bounded: progress is dropped before anything else).

Replay rules, kept by :class:`CommandBook` alone:

- a command id is accepted once; its sequence number must exceed the last accepted for its model;
- a retained command the device has already accepted comes back on every (re)subscribe: it is ignored
  quietly; the same command sent live is a replay and is reported.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.agent.receiver import ChunkReceiver, Transfer, directory_size
from edgepack.agent.service import DeviceAgent, describe_store
from edgepack.errors import (
    EdgepackError,
    IndexMismatchError,
    InstallError,
    ReplayedCommandError,
    StaleCommandError,
    TargetMismatchError,
    WrongRecipientError,
)
from edgepack.fsutil import atomic_write_json, read_json
from edgepack.manifest import utc_now
from edgepack.mqtt import MqttClient, MqttOptions, Received, Will
from edgepack.protocol import (
    MAX_NEED_CHUNKS,
    AcceptedEvent,
    ChunkIndex,
    DeviceState,
    InstallCommand,
    ModelStatus,
    NeedEvent,
    ProgressEvent,
    RejectedEvent,
    ResultEvent,
    RollbackCommand,
    SignedCommand,
    TopicMatch,
    Topics,
    TransferCounters,
    TransferStatus,
    encode,
    error_code,
    groups_from_labels,
    parse_command,
    sha256_hex,
    verify_command,
)

log = logging.getLogger(__name__)

COMMANDS_FILE = "commands.json"
DONE_KEPT = 256
JSON = "application/json"

AnyEvent = AcceptedEvent | ProgressEvent | NeedEvent | ResultEvent | RejectedEvent


@dataclass
class LinkOptions:
    """Tuning of the link; the defaults suit a device, tests shorten the waits."""

    stall_s: float = 5.0  # nothing arrived for this long while chunks are missing: publish a need
    need_max_s: float = 60.0  # the wait between needs doubles up to this
    progress_interval_s: float = 0.5
    max_rate: int | None = None  # bytes/s of chunks to take in (None: as fast as the broker sends)
    session_expiry_s: int = 3600  # MQTT 5: the broker keeps the session this long across a disconnect
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30
    will_delay_s: int = 0  # MQTT 5: a reconnect within this delay does not mark the device offline
    event_expiry_s: int = 86400  # MQTT 5: events nobody picked up expire
    receive_maximum: int = 16  # MQTT 5: chunks in flight to the device (bounds memory and what a drop loses)


class _Stopped(Exception):
    """The link is stopping; the job stays pending and resumes at the next start."""


class _Superseded(Exception):
    """A newer command for the same model replaced the running one."""


# --- replay protection and the queue ---------------------------------------------------------------


class CommandBook:
    """Accepted commands, persisted in ``STATE/commands.json``: the replay rules and the pending queue.

    Invariants: an id is accepted at most once; ``last_seq[model]`` only grows; a command is written to
    ``pending`` (atomically, with ``last_seq``) before any of its work starts, and leaves it when it ends.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        raw: dict[str, Any] = {"version": 1, "last_seq": {}, "done": [], "pending": []}
        if path.exists():
            try:
                raw = read_json(path)
                self._pending = [SignedCommand.model_validate(p) for p in raw["pending"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise InstallError(f"{path} is corrupt ({exc}); remove it to forget accepted commands") from exc
        else:
            self._pending = []
        self._last_seq: dict[str, int] = dict(raw["last_seq"])
        self._done: list[dict[str, Any]] = list(raw["done"])

    def check(self, signed: SignedCommand, *, retained: bool) -> bool:
        """True when the command is new; False to ignore it quietly; raises when it must be refused."""
        command = signed.command
        with self._lock:
            if any(p.command.id == command.id for p in self._pending):
                return False  # already accepted and running: a redelivery, not a new command
            done = next((d for d in self._done if d["id"] == command.id), None)
            if done is not None:
                if retained:
                    return False
                raise ReplayedCommandError(
                    f"replayed command {command.id}: it was already accepted ({done['outcome']}) and is not run twice"
                )
            last = self._last_seq.get(command.model, 0)
            if command.seq <= last:
                raise StaleCommandError(
                    f"command {command.id} for {command.model} has sequence {command.seq}, not newer than "
                    f"{last} already accepted (an older or replayed command; check the operator's clock)"
                )
        if command.expires_at is not None and command.expires_at <= utc_now():
            raise StaleCommandError(f"command {command.id} expired at {command.expires_at.isoformat()}")
        return True

    def accept(self, signed: SignedCommand) -> list[SignedCommand]:
        """Record ``signed`` as pending; returns the pending installs of the same model it supersedes."""
        command = signed.command
        with self._lock:
            superseded = []
            if isinstance(command, InstallCommand):
                superseded = [
                    p
                    for p in self._pending
                    if isinstance(p.command, InstallCommand) and p.command.model == command.model
                ]
            self._pending = [p for p in self._pending if p not in superseded] + [signed]
            self._last_seq[command.model] = command.seq
            for old in superseded:
                self._remember(old.command.id, "superseded")
            self._save()
        return superseded

    def finish(self, command_id: str, outcome: str) -> None:
        with self._lock:
            self._pending = [p for p in self._pending if p.command.id != command_id]
            self._remember(command_id, outcome)
            self._save()

    def pending(self) -> list[SignedCommand]:
        with self._lock:
            return list(self._pending)

    def _remember(self, command_id: str, outcome: str) -> None:
        self._done = [d for d in self._done if d["id"] != command_id][-(DONE_KEPT - 1) :]
        self._done.append({"id": command_id, "outcome": outcome})

    def _save(self) -> None:
        atomic_write_json(
            self.path,
            {
                "version": 1,
                "last_seq": self._last_seq,
                "done": self._done,
                "pending": [p.model_dump(mode="json") for p in self._pending],
            },
        )


# --- the link ------------------------------------------------------------------------------------


@dataclass
class _Job:
    signed: SignedCommand
    resumed: bool = False
    superseded: threading.Event = field(default_factory=threading.Event)
    transfer: Transfer | None = None

    @property
    def command(self) -> InstallCommand | RollbackCommand:
        return self.signed.command


class AgentLink:
    """The MQTT side of one :class:`DeviceAgent`; :meth:`start` never waits for the broker."""

    def __init__(
        self,
        agent: DeviceAgent,
        options: LinkOptions | None = None,
        *,
        client: MqttClient | None = None,
    ) -> None:
        self.agent = agent
        self.config = agent.config
        self.options = options or LinkOptions()
        self.device_id = self.config.device_id
        self.topics = Topics(self.config.broker.prefix)
        self.groups = groups_from_labels(self.config.labels)
        skipped = {f"{k}={v}" for k, v in self.config.labels.items()} - set(self.groups)
        if skipped:
            log.warning("labels %s cannot name a group in a topic; no group commands for them", sorted(skipped))
        quota = int(self.config.disk_quota_mb * (1 << 20)) if self.config.disk_quota_mb else None
        self.receiver = ChunkReceiver(
            agent.store.root / "incoming", quota_bytes=quota, usage=lambda: directory_size(agent.store.root)
        )
        self.book = CommandBook(agent.store.root / COMMANDS_FILE)
        self.client = client or MqttClient(
            MqttOptions.from_settings(
                self.config.broker,
                self.device_id,
                session_expiry_s=self.options.session_expiry_s,
                reconnect_min_s=self.options.reconnect_min_s,
                reconnect_max_s=self.options.reconnect_max_s,
                receive_maximum=self.options.receive_maximum,
            ),
            on_message=self._on_message,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
        )
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._work_ready = threading.Condition(self._lock)
        self._jobs: list[_Job] = []
        self._current: _Job | None = None
        self._transfer: Transfer | None = None
        self._index_topic: str | None = None
        self._index_payloads: deque[tuple[bytes, bool]] = deque(maxlen=4)
        self._buffer: deque[AnyEvent] = deque()
        self._event_seq = itertools.count(1)
        self.dropped_events = 0
        self._connected_at = 0.0
        self._rate_next = 0.0
        self._worker: threading.Thread | None = None
        self._prev_state_hook = agent.installer.on_state
        agent.installer.on_state = self._on_install_state

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Resume pending commands, then connect in the background (the broker may well be down)."""
        pending = self.book.pending()
        self._jobs = [_Job(p, resumed=True) for p in pending]
        keep = {p.command.bundle for p in pending if isinstance(p.command, InstallCommand)}
        for gone in self.receiver.discard_all_but(keep):
            log.info("removed partial transfer %s… that no pending command needs", gone[:12])
        self.client.set_will(
            Will(
                self.topics.state(self.device_id), encode(self._state(online=False)), 1, True, self.options.will_delay_s
            )
        )
        self.client.subscribe(
            [self.topics.device_command(self.device_id)] + [self.topics.group_command(g) for g in self.groups]
        )
        self._worker = threading.Thread(target=self._work, name=f"edgepack-link-{self.device_id}", daemon=True)
        self._worker.start()
        self.client.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop working (a pending job resumes at the next start), mark the device offline, disconnect."""
        self._stop.set()
        with self._lock:
            self._work_ready.notify_all()
            transfer = self._transfer
        if transfer is not None:
            transfer.poke()
        if self._worker is not None:
            self._worker.join(timeout)
            if self._worker.is_alive():
                log.warning("the link's worker is still busy (an install in progress); not waiting for it")
        if self.client.is_connected:
            info = self.client.publish(
                self.topics.state(self.device_id), encode(self._state(online=False)), retain=True, content_type=JSON
            )
            info.wait_for_publish(2.0)
        self.client.stop()
        self.agent.installer.on_state = self._prev_state_hook

    @property
    def connected(self) -> bool:
        return self.client.is_connected

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._current is not None or bool(self._jobs)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "connected": self.connected,
                "protocol": self.client.protocol,
                "pending": [j.command.id for j in self._jobs],
                "current": self._current.command.id if self._current else None,
                "buffered_events": len(self._buffer),
                "dropped_events": self.dropped_events,
                "counters": self.receiver.counters.as_dict(),
            }

    # --- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        self._connected_at = time.monotonic()
        self._publish_state()
        with self._lock:
            buffered, self._buffer = list(self._buffer), deque()
        for event in buffered:
            self._send(event)
        with self._lock:
            self._work_ready.notify_all()

    def _on_disconnect(self, reason: str) -> None:
        log.info("broker connection lost (%s); serving on, events are buffered", reason)

    def _on_message(self, message: Received) -> None:
        match = self.topics.parse(message.topic)
        if match is None:
            log.debug("ignoring a message on %s", message.topic)
            return
        try:
            if match.kind in ("device_cmd", "group_cmd"):
                self._on_command(match, message)
            elif match.kind == "index":
                self._on_index(match, message)
            elif match.kind == "chunk":
                self._on_chunk(match, message)
        except EdgepackError as exc:
            log.warning("rejected a message on %s: %s", message.topic, exc)
            self._reject(message.topic, exc)
        except Exception as exc:  # one bad message must not stop the link: report it, log it, go on
            log.exception("error handling a message on %s", message.topic)
            self._reject(message.topic, exc)

    def _on_command(self, match: TopicMatch, message: Received) -> None:
        if not message.payload:
            return  # a cleared retained command
        signed = parse_command(message.payload)
        command = signed.command
        try:
            self._check_recipient(match, signed)
            verify_command(signed, self.agent.trust)
            if not self.book.check(signed, retained=message.retained):
                log.debug("command %s is already known; ignored", command.id)
                return
        except EdgepackError as exc:
            log.warning("refused command %s from %s: %s", command.id, message.topic, exc)
            self._reject(message.topic, exc, command.id)
            return
        superseded = self.book.accept(signed)
        log.info("accepted %s %s (command %s)", command.action, command.model, command.id)
        with self._lock:
            for old in superseded:
                if self._current is not None and self._current.command.id == old.command.id:
                    self._current.superseded.set()
                    if self._transfer is not None:
                        self._transfer.poke()
                else:
                    self._jobs = [j for j in self._jobs if j.command.id != old.command.id]
                    self._emit(
                        ResultEvent(
                            **self._base(old.command.id),
                            outcome="superseded",
                            model=old.command.model,
                            reason=f"superseded by command {command.id}",
                        )
                    )
            self._jobs.append(_Job(signed))
            self._work_ready.notify_all()

    def _check_recipient(self, match: TopicMatch, signed: SignedCommand) -> None:
        to = signed.command.to
        if match.kind == "device_cmd":
            if to.device != self.device_id:
                raise WrongRecipientError(
                    f"command {signed.command.id} is for {to.describe()}, not device {self.device_id}"
                )
        elif to.group != match.key or match.key not in self.groups:
            raise WrongRecipientError(
                f"command {signed.command.id} is for {to.describe()}; device {self.device_id} is in "
                f"{', '.join(self.groups) or 'no group'}"
            )

    def _on_index(self, match: TopicMatch, message: Received) -> None:
        with self._lock:
            if message.topic != self._index_topic:
                return
            self._index_payloads.append((message.payload, message.retained))
            self._work_ready.notify_all()

    def _on_chunk(self, match: TopicMatch, message: Received) -> None:
        with self._lock:
            transfer = self._transfer
        if transfer is None:
            return
        try:
            if transfer.offer(match.key, message.payload):
                self.client.unsubscribe([message.topic])
        finally:
            self._throttle(len(message.payload))

    def _throttle(self, size: int) -> None:
        if not self.options.max_rate:
            return
        now = time.monotonic()
        self._rate_next = max(self._rate_next, now) + size / self.options.max_rate
        if self._rate_next - now > 0.01:
            time.sleep(self._rate_next - now)

    # --- the worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                while not self._jobs and not self._stop.is_set():
                    self._work_ready.wait(1.0)
                if self._stop.is_set():
                    return
                job = self._current = self._jobs.pop(0)
            try:
                self._run(job)
            except _Stopped:
                log.info("stopping with command %s pending; it resumes at the next start", job.command.id)
                return
            except Exception as exc:  # a bug must not stop the worker for good: end the job, report, log
                log.exception("command %s failed unexpectedly", job.command.id)
                self._finish(job, self._failure(job, exc))
            finally:
                with self._lock:
                    self._current = None

    def _run(self, job: _Job) -> None:
        command = job.command
        self._emit(
            AcceptedEvent(**self._base(command.id), action=command.action, model=command.model, resumed=job.resumed)
        )
        counters = None
        try:
            if isinstance(command, InstallCommand):
                outcome, version, timings, counters = self._install(job, command)
            else:
                result = self.agent.rollback(command.model)
                outcome, version, timings = "committed", result.version, result.timings
        except _Superseded:
            self._finish(
                job,
                ResultEvent(
                    **self._base(command.id),
                    outcome="superseded",
                    model=command.model,
                    reason="superseded by a newer command",
                ),
            )
            return
        except _Stopped:
            raise
        except (EdgepackError, OSError) as exc:
            log.warning("command %s (%s %s) failed: %s", command.id, command.action, command.model, exc)
            self._finish(job, self._failure(job, exc))
            return
        finally:
            with self._lock:
                self._transfer = None
        self._finish(
            job,
            ResultEvent(
                **self._base(command.id),
                outcome=outcome,  # type: ignore[arg-type]
                model=command.model,
                version=version,
                timings=timings,
                transfer=counters,
            ),
        )

    def _failure(self, job: _Job, exc: BaseException) -> ResultEvent:
        """The result of a job that raised: ``rolled_back`` when the install state machine refused the
        bundle (the live model never changed), ``failed`` when it ended before."""
        command = job.command
        rolled_back = isinstance(exc, InstallError) and isinstance(command, InstallCommand)
        return ResultEvent(
            **self._base(command.id),
            outcome="rolled_back" if rolled_back else "failed",
            model=command.model,
            version=getattr(command, "version", None),
            code=error_code(exc),
            reason=str(exc) or type(exc).__name__,
            transfer=job.transfer.counters.to_message() if job.transfer else None,
        )

    def _finish(self, job: _Job, event: ResultEvent) -> None:
        self.book.finish(job.command.id, event.outcome)
        if isinstance(job.command, InstallCommand) and not any(
            isinstance(p.command, InstallCommand) and p.command.bundle == job.command.bundle
            for p in self.book.pending()
        ):
            self.receiver.discard(job.command.bundle)
        with self._lock:
            self._transfer = None
            self._current = None
        self._publish_state()  # before the result, so whoever reads the result finds the new state
        self._emit(event)

    def _install(
        self, job: _Job, command: InstallCommand
    ) -> tuple[str, str, dict[str, float], TransferCounters | None]:
        state = self.agent.store.load_state()
        if state.model(command.model).active == command.bundle:
            return "committed", command.version, {}, None
        targets = self.config.targets
        if targets and command.target not in targets:
            raise TargetMismatchError(
                f"bundle {command.model} {command.version} is built for target {command.target!r}; this device "
                f"accepts {', '.join(sorted(targets))} — not downloaded"
            )
        index = self.receiver.saved_index(command)
        if index is None:
            self.receiver.check_space(command.size, command.bundle)
            index = self._fetch_index(job, command)
        transfer = job.transfer = self.receiver.open(index)
        with self._lock:
            self._transfer = transfer
        started = time.monotonic()
        try:
            self._fetch_chunks(job, transfer)
            path = transfer.assemble()
        finally:
            transfer.close()
        download_s = round(time.monotonic() - started, 4)
        self._emit(
            ProgressEvent(
                **self._base(command.id),
                phase="downloaded",
                bundle=command.bundle,
                held_bytes=index.size,
                total_bytes=index.size,
            )
        )
        with self._lock:
            self._transfer = None
        try:
            result = self.agent.install(path)
        finally:
            path.unlink(missing_ok=True)
        return "committed", result.version, {"download": download_s, **result.timings}, transfer.counters.to_message()

    def _fetch_index(self, job: _Job, command: InstallCommand) -> ChunkIndex:
        topic = self.topics.index(command.bundle)
        with self._lock:
            self._index_topic = topic
            self._index_payloads.clear()
        self.client.subscribe([topic])
        self._emit(
            ProgressEvent(**self._base(command.id), phase="index", bundle=command.bundle, total_bytes=command.size)
        )
        try:
            waiter = _NeedTimer(self.options, lambda: self._connected_at)
            while True:
                with self._lock:
                    self._check_running(job)
                    if not self._index_payloads:
                        self._work_ready.wait(0.2)
                    payload = self._index_payloads.popleft() if self._index_payloads else None
                if payload is not None:
                    data, _retained = payload
                    if sha256_hex(data) != command.index_sha256:
                        self._reject(
                            topic,
                            IndexMismatchError(
                                f"chunk index for bundle {command.bundle[:12]}… does not match the hash its signed command "
                                "pins (altered, or from another deploy); waiting for the right one"
                            ),
                            command.id,
                        )
                        continue
                    return self.receiver.accept_index(command, data)
                if waiter.due(progressed=False) and self.connected:
                    self._emit(NeedEvent(**self._base(command.id), bundle=command.bundle, index=True))
        finally:
            with self._lock:
                self._index_topic = None
            self.client.unsubscribe([topic])

    def _fetch_chunks(self, job: _Job, transfer: Transfer) -> None:
        command = job.command
        missing = {sha: self.topics.chunk(sha) for sha in transfer.missing()}
        self.client.subscribe(list(missing.values()))
        waiter = _NeedTimer(self.options, lambda: self._connected_at)
        last_held, last_progress = -1, 0.0
        try:
            while not transfer.complete:
                with self._lock:
                    self._check_running(job)
                transfer.wait(0.2)
                held = transfer.held_bytes
                now = time.monotonic()
                progressed = held != last_held
                if progressed and now - last_progress >= self.options.progress_interval_s:
                    self._emit(
                        ProgressEvent(
                            **self._base(command.id),
                            phase="download",
                            bundle=transfer.bundle,
                            held_bytes=held,
                            total_bytes=transfer.total_bytes,
                        )
                    )
                    last_progress = now
                last_held = held
                if waiter.due(progressed) and self.connected:
                    positions = transfer.missing_positions()[:MAX_NEED_CHUNKS]
                    log.info("nothing arrived for a while; asking again for %d chunk(s)", len(positions))
                    self._emit(NeedEvent(**self._base(command.id), bundle=transfer.bundle, chunks=positions))
        finally:
            self.client.unsubscribe(list(missing.values()))  # those still subscribed; received ones went already

    def _check_running(self, job: _Job) -> None:
        """Caller holds the lock."""
        if self._stop.is_set():
            raise _Stopped()
        if job.superseded.is_set():
            raise _Superseded()

    def _on_install_state(self, state: str) -> None:
        self._prev_state_hook(state)
        with self._lock:
            job = self._current
        if job is not None and state in ("verify", "stage", "switch", "commit"):
            self._emit(
                ProgressEvent(**self._base(job.command.id), phase=state, bundle=getattr(job.command, "bundle", None))
            )

    # --- events and state ------------------------------------------------------------------------

    def _base(self, command_id: str | None = None) -> dict[str, Any]:
        return {"device": self.device_id, "at": utc_now(), "command_id": command_id}

    def _reject(self, topic: str, exc: BaseException, command_id: str | None = None) -> None:
        self._emit(
            RejectedEvent(
                **self._base(command_id), code=error_code(exc), reason=str(exc) or type(exc).__name__, topic=topic
            )
        )

    def _emit(self, event: AnyEvent) -> None:
        event = event.model_copy(update={"seq": next(self._event_seq)})
        with self._lock:
            if not self.client.is_connected:
                self._buffer_event(event)
                return
        self._send(event)

    def _buffer_event(self, event: AnyEvent) -> None:
        """Caller holds the lock. Bounded: the oldest progress event goes first, then the oldest of any kind."""
        limit = self.config.broker.max_buffered_events
        if len(self._buffer) >= limit:
            victim = next((e for e in self._buffer if isinstance(e, ProgressEvent)), self._buffer[0])
            self._buffer.remove(victim)
            self.dropped_events += 1
        self._buffer.append(event)

    def _send(self, event: AnyEvent) -> None:
        self.client.publish(
            self.topics.events(self.device_id), encode(event), expiry_s=self.options.event_expiry_s, content_type=JSON
        )

    def _publish_state(self) -> None:
        if not self.client.is_connected:
            return
        self.client.publish(
            self.topics.state(self.device_id), encode(self._state(online=True)), retain=True, content_type=JSON
        )
        self.client.set_will(
            Will(
                self.topics.state(self.device_id), encode(self._state(online=False)), 1, True, self.options.will_delay_s
            )
        )

    def _state(self, *, online: bool) -> DeviceState:
        status = describe_store(self.agent.store, self.agent.live)
        models = {
            name: ModelStatus(
                active=row["active"]["version"] if row["active"] else None,
                previous=row["previous"]["version"] if row["previous"] else None,
                serving=row.get("serving"),
                highest_version=row["highest_version"],
                bundle=row["active"]["bundle"] if row["active"] else None,
            )
            for name, row in status["models"].items()
        }
        with self._lock:
            transfer, job = self._transfer, self._current
            transfer_status = (
                TransferStatus(
                    command_id=job.command.id,
                    bundle=transfer.bundle,
                    held_bytes=transfer.held_bytes,
                    total_bytes=transfer.total_bytes,
                )
                if transfer is not None and job is not None
                else None
            )
        return DeviceState(
            device=self.device_id,
            online=online,
            at=utc_now(),
            labels=self.config.labels,
            groups=self.groups,
            targets=self.config.targets,
            models=models,
            transfer=transfer_status,
            protocol=self.client.protocol,
            agent_version=__version__,
            dropped_events=self.dropped_events,
        )


class _NeedTimer:
    """When to ask again: after ``stall_s`` without progress (counted from the last reconnect too), then
    at doubling intervals up to ``need_max_s``; any progress starts over."""

    def __init__(self, options: LinkOptions, connected_at: Any) -> None:
        self.options = options
        self._connected_at = connected_at
        self._quiet_since = time.monotonic()
        self._delay = options.stall_s
        self._seen_connect = connected_at()

    def due(self, progressed: bool) -> bool:
        now = time.monotonic()
        connected_at = self._connected_at()
        if progressed or connected_at != self._seen_connect:
            self._seen_connect = connected_at
            self._quiet_since, self._delay = now, self.options.stall_s
            return False
        if now - self._quiet_since < self._delay:
            return False
        self._quiet_since = now
        self._delay = min(self._delay * 2, self.options.need_max_s)
        return True


__all__ = ["AgentLink", "CommandBook", "LinkOptions"]
