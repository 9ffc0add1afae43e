"""The operator's primitive: publish a bundle once, send a signed command to a device or a group, follow it.

``edgepack deploy BUNDLE (--device ID | --group NAME) --broker URL --key KEY [--wait]`` runs :func:`deploy`:

1. **Publish the bundle once**: the chunk index and every distinct chunk, retained, QoS 1 (MQTT 5: with a
   message expiry). Devices fetch chunks from the broker's retained store, so the upload is the same
   whether one device or a thousand will fetch it, and a device that is offline now fetches it later.
2. **Send the command**, signed with a key holding the trust store's ``command`` role, retained on the
   device's or the group's command topic: a device that is offline or reconnecting gets it when it comes
   back, also from a broker that keeps no sessions (the device ignores, by id, a command it already ran).
3. With ``wait``: **follow** the devices' events to a result per device, while answering ``need`` events
   (chunks a device could not get from the broker, e.g. after the broker restarted without persistence)
   and publishing the command again after a reconnect (a restarted broker has lost it). The members of a
   group are the devices whose retained state lists the group.

``edgepack serve-bundles BUNDLE… --broker URL`` runs :func:`serve_bundles`: step 3's answering of ``need``
events on its own, for as long as it runs, so devices still fetching when the broker loses its retained
messages are served after the ``deploy`` has returned. (It has no commands to publish again: a device
that never got its command needs the ``deploy`` again.)

The fleet rollout (waves, gates) builds on :class:`Deployer`.

**A clustered broker whose retained store is per node** (RabbitMQ's MQTT plugin: a retained message
lives on the node that received it; ``docs/scaling.md``): give :class:`Deployer` the cluster's other
nodes (``nodes``; ``--node URL`` on the CLI). It then keeps one connection per node and puts every
retained message it writes — the bundle's index and chunks, commands, their clearing — on every node,
and reads the devices' retained states from every node (keeping the newest by its ``at``); events and
need answers are live messages, routed cluster-wide, so they use the first connection only.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn

from edgepack.errors import ConfigError, EdgepackError
from edgepack.fleet.commands import install_command
from edgepack.keys import SigningKey
from edgepack.mqtt import MqttClient, MqttOptions, Received
from edgepack.protocol import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_COMMAND_TTL,
    CommandTarget,
    DeviceState,
    NeedEvent,
    ProgressEvent,
    RejectedEvent,
    ResultEvent,
    SignedCommand,
    Topics,
    encode,
    new_command_fields,
    parse_event,
    parse_state,
    sign_command,
)
from edgepack.transfer import ChunkedBundle, chunk_bundle

log = logging.getLogger(__name__)

JSON = "application/json"
PUBLISH_WINDOW = 64  # chunks in flight before the publisher waits for the oldest acknowledgement
NEED_COALESCE_S = 2.0  # a chunk published again this recently is not published again for another need
NEED_BACKOFF_MAX_S = 60.0  # each further republication of one chunk waits twice as long, up to this
FINAL = ("committed", "rolled_back", "failed", "superseded", "rejected", "timeout", "offline")
DEFAULT_OFFLINE_GRACE_S = 30.0  # a group member offline this long is not waited for (outcome "offline")


class MessageHook(Protocol):
    """Called on the network thread for a device state (``state`` None: the retained state was cleared)
    or an event, with the device id taken from the topic it came on."""

    def __call__(self, device: str, message: Any) -> None: ...


@dataclass
class DeviceProgress:
    """What the operator knows of one device for one command."""

    device: str
    phase: str = "waiting"
    held_bytes: int = 0
    total_bytes: int = 0
    outcome: str | None = None
    version: str | None = None
    code: str | None = None
    reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    transfer: dict[str, int] | None = None
    online: bool | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None


@dataclass
class DeployReport:
    command_id: str
    bundle: str
    to: str
    upload_s: float
    devices: dict[str, DeviceProgress] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.devices) and all(d.outcome == "committed" for d in self.devices.values())


class DeployObserver:
    """What :class:`Deployer` tells as it goes; the default tells nothing."""

    def uploaded(self, chunked: ChunkedBundle, seconds: float) -> None:
        """The bundle is on the broker."""

    def device(self, progress: DeviceProgress) -> None:
        """A device's progress or result changed."""

    def note(self, message: str) -> None:
        """Something the operator should know."""

    def close(self) -> None:
        """The deploy ended."""


class RichProgressObserver(DeployObserver):
    """A rich progress bar per device: phase, bytes held of the bundle, and the outcome."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.fields[device]}"),
            TextColumn("{task.fields[phase]:<11}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[outcome]}"),
            console=self.console,
        )
        self._tasks: dict[str, TaskID] = {}
        self.progress.start()

    def uploaded(self, chunked: ChunkedBundle, seconds: float) -> None:
        self.console.print(
            f"published {chunked.manifest.name} {chunked.manifest.version} ({chunked.index.size / 1e6:.1f} MB, "
            f"{len(chunked.index.chunks)} chunks) in {seconds:.2f} s"
        )

    def device(self, progress: DeviceProgress) -> None:
        task = self._tasks.get(progress.device)
        total = progress.total_bytes or None
        if task is None:
            task = self._tasks[progress.device] = self.progress.add_task(
                progress.device, total=total, device=progress.device, phase=progress.phase, outcome=""
            )
        colour = {"committed": "green", "timeout": "yellow"}.get(progress.outcome or "", "red")
        outcome = f"[{colour}]{progress.outcome}[/] {progress.reason or ''}" if progress.outcome else ""
        self.progress.update(
            task,
            total=total,
            completed=progress.total_bytes
            if progress.phase not in ("waiting", "index", "download")
            else progress.held_bytes,
            phase=progress.phase,
            outcome=outcome,
        )

    def note(self, message: str) -> None:
        self.console.print(message)

    def close(self) -> None:
        self.progress.stop()


class Deployer:
    """One operator connection: publishes bundles and commands, follows devices, answers their needs."""

    def __init__(
        self,
        options: MqttOptions,
        topics: Topics,
        observer: DeployObserver | None = None,
        *,
        connect_timeout: float = 10.0,
        on_state: MessageHook | None = None,
        on_event: MessageHook | None = None,
        nodes: Sequence[MqttOptions] = (),
    ) -> None:
        self.topics = topics
        self.on_state = on_state  # the fleet registry and the rollout engine listen here
        self.on_event = on_event
        self.connect_timeout = connect_timeout  # what ``with Deployer(...)`` waits for the broker
        self.observer = observer or DeployObserver()
        self.client = MqttClient(options, on_message=self._on_message, on_connect=self._on_connect)
        # the other nodes of a cluster whose retained store is per node: retained writes and state reads
        self.mirrors = [MqttClient(o, on_message=lambda m: self._on_message(m, mirror=True)) for o in nodes]
        self.states: dict[str, DeviceState] = {}
        self.state_extras: dict[str, dict[str, Any]] = {}  # fields of a state this operator's schema lacks
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._bundles: dict[str, ChunkedBundle] = {}
        self._commands: dict[str, SignedCommand] = {}
        self._following: dict[str, dict[str, DeviceProgress]] = {}  # command id -> device -> progress
        self._needs: queue.Queue[NeedEvent | None] = queue.Queue()
        self._recent: dict[tuple[str, int], tuple[float, float]] = {}  # (bundle, position) -> (when, quiet for)
        # bundles published on this connection since it was last (re)established: the broker holds them
        self._held: set[str] = set()
        self._doubted: dict[tuple[str, int], set[str]] = {}  # (bundle, position or -1) -> devices asked once
        self._answerer: threading.Thread | None = None
        self.needs_received = 0  # need events from devices, for a bundle this operator has
        self.republished = 0  # chunks (and indexes) published again in answer to needs
        self.republished_bytes = 0
        self._sync_topic = topics.operator_sync(options.client_id)
        self._synced: set[str] = set()

    def __enter__(self) -> Deployer:
        self.connect(self.connect_timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, timeout: float = 10.0) -> None:
        self.client.subscribe([self.topics.all_states, self.topics.all_events, self._sync_topic])
        self.client.connect(timeout)
        for mirror in self.mirrors:
            mirror.subscribe([self.topics.all_states, self.topics.operator_sync(mirror.options.client_id)])
            mirror.connect(timeout)
        self._answerer = threading.Thread(target=self._answer_needs, name="edgepack-deploy-needs", daemon=True)
        self._answerer.start()

    def close(self) -> None:
        self._needs.put(None)
        if self._answerer is not None:
            self._answerer.join(5)
        for mirror in self.mirrors:
            mirror.stop()
        self.client.stop()

    @property
    def clients(self) -> list[MqttClient]:
        """Every connection: the first one, then one per other node of a cluster."""
        return [self.client, *self.mirrors]

    def publish_retained(self, topic: str, payload: bytes, **kwargs: Any) -> list[Any]:
        """Publish a retained message on every node (one node's retained store may not be another's)."""
        return [c.publish(topic, payload, retain=True, **kwargs) for c in self.clients]

    def wait_all(self, infos: Iterable[Any], timeout: float) -> None:
        """Wait for the acknowledgement of publishes made on any of the connections."""
        self.client.wait_published(list(infos), timeout)

    # --- publishing ------------------------------------------------------------------------------

    def publish_bundle(self, chunked: ChunkedBundle, *, expiry_s: int | None = None, timeout: float = 300.0) -> float:
        """Publish the index and every distinct chunk, retained; returns the seconds until all were acknowledged."""
        self._bundles[chunked.bundle] = chunked
        started = time.monotonic()
        for client in self.clients:  # each node of a cluster with per-node retained messages holds a copy
            window: deque[Any] = deque()
            window.append(
                client.publish(
                    self.topics.index(chunked.bundle),
                    chunked.index_bytes,
                    retain=True,
                    expiry_s=expiry_s,
                    content_type=JSON,
                )
            )
            for _position, ref, data in chunked.iter_chunks():
                window.append(client.publish(self.topics.chunk(ref.sha256), data, retain=True, expiry_s=expiry_s))
                if len(window) >= PUBLISH_WINDOW:
                    client.wait_published([window.popleft()], timeout)
            client.wait_published(window, timeout)
        seconds = time.monotonic() - started
        self._held.add(chunked.bundle)
        log.info("published bundle %s… (%d bytes) in %.2f s", chunked.bundle[:12], chunked.index.size, seconds)
        self.observer.uploaded(chunked, seconds)
        return seconds

    def offer(self, chunked: ChunkedBundle) -> None:
        """Answer devices' ``need`` events for ``chunked`` from now on, without publishing it."""
        self._bundles[chunked.bundle] = chunked

    def send(self, signed: SignedCommand, *, expiry_s: int | None = None, timeout: float | None = 30.0) -> Any:
        """Publish a signed command, retained, on its device's or group's command topic (``timeout`` None:
        do not wait for the acknowledgement; returns paho's message info)."""
        with self._lock:
            self._commands[signed.command.id] = signed
            self._following.setdefault(signed.command.id, {})
        info = self._publish_command(signed, expiry_s)
        if timeout is not None:
            self.client.wait_published([info], timeout)
        return info

    def retract(self, command_id: str, topic: str) -> Any:
        """Clear the retained command on ``topic`` and stop publishing ``command_id`` again after a reconnect
        (a device that already accepted it goes on: it persisted it; one that had not will never see it)."""
        with self._lock:
            self._commands.pop(command_id, None)
            self._following.pop(command_id, None)
        return self.publish_retained(topic, b"")[0]

    def clear_bundle(self, chunked: ChunkedBundle, *, keep: Iterable[ChunkedBundle] = (), timeout: float = 60.0) -> int:
        """Remove the bundle's retained index and chunks from the broker, except chunks a bundle in ``keep``
        also holds (chunks are content-addressed: one retained message can serve several bundles).
        Returns how many retained messages were cleared."""
        kept = {ref.sha256 for other in keep for ref in other.index.chunks}
        topics = [self.topics.index(chunked.bundle)]
        topics += sorted({self.topics.chunk(ref.sha256) for ref in chunked.index.chunks if ref.sha256 not in kept})
        self.wait_all([info for topic in topics for info in self.publish_retained(topic, b"")], timeout)
        log.info("cleared bundle %s… from the broker (%d retained messages)", chunked.bundle[:12], len(topics))
        return len(topics)

    # --- following -------------------------------------------------------------------------------

    def sync(self, timeout: float = 10.0) -> None:
        """Wait until the retained messages sent before now (device states) have arrived.

        The broker sends a subscription's retained messages before a message published after it, so a
        marker sent to ourselves arrives after them.
        """
        markers = []
        for client in self.clients:
            marker = uuid.uuid4().hex
            markers.append(marker)
            client.publish(self.topics.operator_sync(client.options.client_id), marker.encode())
        with self._changed:
            if not self._changed.wait_for(lambda: all(m in self._synced for m in markers), timeout):
                log.warning(
                    "the broker did not return a sync marker within %g s; device states may be missing", timeout
                )

    def members(self, group: str) -> list[str]:
        """Devices whose retained state says they are in ``group`` (call :meth:`sync` first)."""
        with self._lock:
            return sorted(d for d, s in self.states.items() if group in s.groups)

    def wait(
        self,
        command_id: str,
        devices: Iterable[str] | None,
        timeout: float,
        *,
        offline_grace: float | None = None,
    ) -> dict[str, DeviceProgress]:
        """Follow ``command_id`` until every device in ``devices`` has a result (None: every device that
        reports on it, ending when all of them have one), or ``timeout``; unfinished ones get ``timeout``.

        With ``offline_grace``, a device whose state says it is offline (or whose retained state was
        cleared, ``edgepack fleet forget``) for that long is not waited for: its outcome is ``offline``."""
        deadline = time.monotonic() + timeout
        offline_since: dict[str, float] = {}
        with self._lock:
            following = self._following.setdefault(command_id, {})
            for device in devices or ():
                following.setdefault(device, DeviceProgress(device, online=self._online(device)))
            expected = set(devices) if devices is not None else None
        for progress in list(following.values()):
            self.observer.device(progress)
        with self._changed:
            while True:
                if offline_grace is not None:
                    self._drop_offline(following, offline_since, offline_grace)
                names = expected if expected is not None else set(following)
                if names and all(following[d].done for d in names if d in following) and names <= set(following):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(min(remaining, 0.5))
            timed_out = [p for p in following.values() if not p.done]
            for progress in timed_out:
                progress.outcome = "timeout"
                offline = progress.online is False
                progress.reason = "the device is offline" if offline else f"no result within {timeout:g} s"
            result = dict(following)
        for progress in timed_out:
            self.observer.device(progress)
        return result

    def _drop_offline(self, following: dict[str, DeviceProgress], since: dict[str, float], grace: float) -> None:
        """Caller holds the lock: give ``offline`` to devices offline (or forgotten) for ``grace`` seconds."""
        now = time.monotonic()
        for name, progress in following.items():
            if progress.done:
                continue
            gone = progress.online is False or name not in self.states
            if not gone:
                since.pop(name, None)
                continue
            if now - since.setdefault(name, now) >= grace:
                progress.outcome, progress.phase = "offline", "done"
                forgotten = name not in self.states
                progress.reason = (
                    f"no retained state (forgotten or never seen) for {grace:g} s"
                    if forgotten
                    else f"offline for {grace:g} s; it fetches the command when it returns"
                )
                self.observer.device(progress)

    # --- callbacks (network thread) --------------------------------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        if self.client.connects <= 1:
            return
        self._recent.clear()  # the broker may have restarted without its retained store: answer needs at once
        self._held.clear()
        self._doubted.clear()
        with self._lock:
            commands = list(self._commands.values())
        for signed in commands:  # a broker that restarted without persistence has lost them
            self._publish_command(signed, None)

    def _on_message(self, message: Received, mirror: bool = False) -> None:
        match = self.topics.parse(message.topic)
        if match is None or (mirror and match.kind not in ("state", "sync")):
            return  # from another node only retained states matter: live messages reach the first one
        if not message.payload:
            if match.kind == "state":  # a cleared retained state: the device was forgotten
                with self._lock:
                    self.states.pop(match.key, None)
                    self.state_extras.pop(match.key, None)
                if self.on_state is not None:
                    self.on_state(match.key, None)
            return
        try:
            if match.kind == "sync":
                with self._changed:
                    self._synced.add(message.payload.decode(errors="replace"))
                    self._changed.notify_all()
            elif match.kind == "state":
                state = parse_state(message.payload)
                if state.device != match.key:
                    log.warning("ignoring a state of %r published on %s's topic", state.device, match.key)
                    return
                extras = _state_extras(message.payload)
                with self._lock:
                    known = self.states.get(state.device)
                    if (mirror or message.retained) and known is not None and known.at > state.at:
                        return  # an older copy (another node's retained one) of a state already had
                    self.states[state.device] = state
                    self.state_extras[state.device] = extras
                    for following in self._following.values():
                        if state.device in following:
                            following[state.device].online = state.online
                if self.on_state is not None:
                    self.on_state(match.key, state)
            elif match.kind == "events":
                event = parse_event(message.payload)
                if event.device != match.key:  # results count only from the device's own topic
                    log.warning("ignoring an event of %r published on %s's topic", event.device, match.key)
                    return
                self._on_event(event)
                if self.on_event is not None:
                    self.on_event(match.key, event)
        except EdgepackError as exc:
            log.info("ignoring a malformed message on %s: %s", message.topic, exc)

    def _on_event(self, event: Any) -> None:
        if isinstance(event, NeedEvent):
            if event.bundle in self._bundles:
                self.needs_received += 1
                self._needs.put(event)
            else:
                log.debug(
                    "device %s needs bundle %s…, which this operator does not have", event.device, event.bundle[:12]
                )
        with self._changed:
            following = self._following.get(event.command_id or "")
            if following is None:
                return
            progress = following.setdefault(event.device, DeviceProgress(event.device, online=True))
            if progress.done:
                return  # e.g. "replayed" after the command was published again: the result stands
            if isinstance(event, ProgressEvent):
                progress.phase = event.phase
                progress.held_bytes = event.held_bytes or progress.held_bytes
                progress.total_bytes = event.total_bytes or progress.total_bytes
            elif isinstance(event, ResultEvent):
                progress.outcome, progress.version = event.outcome, event.version
                progress.code, progress.reason, progress.timings = event.code, event.reason, event.timings
                progress.phase = "done"
                if event.transfer is not None:
                    progress.transfer = event.transfer.model_dump()
            elif isinstance(event, RejectedEvent) and self._is_command_topic(event.topic):
                # the command itself was refused (a refused chunk or index only delays the transfer)
                progress.outcome, progress.code, progress.reason = "rejected", event.code, event.reason
                progress.phase = "done"
            self._changed.notify_all()
        self.observer.device(progress)

    # --- internals -------------------------------------------------------------------------------

    def _is_command_topic(self, topic: str) -> bool:
        match = self.topics.parse(topic)
        return match is not None and match.kind in ("device_cmd", "group_cmd")

    def _online(self, device: str) -> bool | None:
        state = self.states.get(device)
        return state.online if state else None

    def _publish_command(self, signed: SignedCommand, expiry_s: int | None) -> Any:
        to = signed.command.to
        topic = self.topics.device_command(to.device) if to.device else self.topics.group_command(to.group or "")
        if expiry_s is None and signed.command.expires_at is not None:
            expiry_s = max(1, int((signed.command.expires_at - signed.command.issued_at).total_seconds()))
        # on every node, so that a device (re)connecting to any node finds it retained; a device that is
        # connected gets it once per node and ignores the copies (a pending command id is not run twice)
        return self.publish_retained(topic, encode(signed), expiry_s=expiry_s, content_type=JSON)[0]

    def _answer_needs(self) -> None:
        while (need := self._needs.get()) is not None:
            try:
                self._answer(need)
            except (EdgepackError, OSError) as exc:  # e.g. the bundle file changed: say so, keep answering
                log.error("cannot answer device %s's need for bundle %s…: %s", need.device, need.bundle[:12], exc)

    def _held_doubt(self, need: NeedEvent, position: int) -> bool:
        """True to let this need pass unanswered: the broker holds the piece, and this is the device's
        first request for it. The bundle was published, retained, on this connection, which has not been
        interrupted since (so the broker was not restarted), and the device subscribes again before it
        asks: a first need from it means a broker that is slow, not one that lost the piece. Its second
        request for the same piece is answered (a node of a cluster that the operator does not write to
        holds nothing: ``--node``)."""
        if need.bundle not in self._held:
            return False
        asked = self._doubted.setdefault((need.bundle, position), set())
        if need.device in asked:
            asked.discard(need.device)
            return False
        asked.add(need.device)
        return True

    def _answer(self, need: NeedEvent) -> None:
        chunked = self._bundles[need.bundle]
        now = time.monotonic()
        if need.index and not self._held_doubt(need, -1):
            self.client.publish(self.topics.index(chunked.bundle), chunked.index_bytes, retain=True, content_type=JSON)
            self.republished += 1
            self.republished_bytes += len(chunked.index_bytes)
        answered = 0
        for position in need.chunks:
            if not 0 <= position < len(chunked.index.chunks):
                continue
            if self._held_doubt(need, position):
                continue  # the broker holds it (published on this connection): the device is asked to wait
            key = (chunked.bundle, position)
            last, quiet = self._recent.get(key, (-1e9, NEED_COALESCE_S / 2))
            if now - last < quiet:
                continue  # published again a moment ago for another device's need: it is on its way
            # Back off per chunk: a republished retained chunk goes to *every* device still subscribed to it,
            # so on a broker that is merely slow (not one that lost its retained store) answering each need
            # at once multiplies the load that made devices stall (measured: 107 bundle copies of ingress
            # for a 1,000-device rollout on a loaded host). 2 s, 4 s, 8 s … up to 60 s between copies.
            self._recent[key] = (now, min(quiet * 2, NEED_BACKOFF_MAX_S))
            ref = chunked.index.chunks[position]
            data = chunked.chunk(position)
            self.client.publish(self.topics.chunk(ref.sha256), data, retain=True)
            answered += 1
            self.republished += 1
            self.republished_bytes += len(data)
        log.info(
            "device %s needs %s%d chunk(s) of %s…; published %d again",
            need.device,
            "the index and " if need.index else "",
            len(need.chunks),
            need.bundle[:12],
            answered,
        )


def _state_extras(payload: bytes) -> dict[str, Any]:
    """Fields of a device state that :class:`DeviceState` does not define (``health``, ``runtime``, … of
    newer agents), kept for the registry: the schema ignores them, the operator still shows them."""
    try:
        raw = json.loads(payload)
    except ValueError:
        return {}
    known = set(DeviceState.model_fields)
    return {k: v for k, v in raw.items() if k not in known} if isinstance(raw, dict) else {}


def deploy(
    bundle: Path,
    *,
    options: MqttOptions,
    keys: list[SigningKey],
    device: str | None = None,
    group: str | None = None,
    prefix: str = "edgepack",
    wait: bool = False,
    timeout: float = 600.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ttl: timedelta = DEFAULT_COMMAND_TTL,
    observer: DeployObserver | None = None,
    connect_timeout: float = 10.0,
    offline_grace: float | None = DEFAULT_OFFLINE_GRACE_S,
    seq: int | None = None,
) -> DeployReport:
    """Publish ``bundle`` and an install command to ``device`` or ``group``; with ``wait``, follow it.

    ``seq``: the command's sequence number from the fleet journal's counter (``Journal.next_command_seq``);
    None falls back to the issue time.

    Waiting on a group, members that are offline (or whose state was cleared) for ``offline_grace``
    seconds end as ``offline`` instead of holding the wait until ``timeout`` (None: wait for them)."""
    if (device is None) == (group is None):
        raise ConfigError("deploy to exactly one of --device ID or --group NAME")
    if not keys:
        raise ConfigError("deploy needs a key with the trust store's 'command' role (--key KEY)")
    observer = observer or DeployObserver()
    to = CommandTarget(device=device, group=group)
    topics = Topics(prefix)
    chunked = chunk_bundle(bundle, chunk_size)
    command = install_command(chunked, new_command_fields(to, ttl=ttl, seq=seq))
    signed = sign_command(command, keys)
    bundle_expiry = int(ttl.total_seconds()) if ttl else None
    try:
        with Deployer(options, topics, observer, connect_timeout=connect_timeout) as deployer:
            upload_s = deployer.publish_bundle(chunked, expiry_s=bundle_expiry)
            deployer.send(signed)
            report = DeployReport(command.id, chunked.bundle, to.describe(), upload_s)
            if not wait:
                return report
            if group:
                deployer.sync()
            expected: list[str] | None = [device] if device else deployer.members(group or "")
            if group and not expected:
                observer.note(f"no device has published state as a member of group {group!r} yet; waiting for any")
                expected = None
            grace = offline_grace if group else None
            report.devices = deployer.wait(command.id, expected, timeout, offline_grace=grace)
            return report
    finally:
        observer.close()


def serve_bundles(
    bundles: Iterable[Path],
    *,
    options: MqttOptions,
    prefix: str = "edgepack",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    publish: bool = False,
    stop: threading.Event,
    observer: DeployObserver | None = None,
    connect_timeout: float = 10.0,
) -> list[ChunkedBundle]:
    """Answer devices' ``need`` events for ``bundles`` until ``stop`` is set: a bundle server that outlives
    the ``deploy`` that shipped them, for brokers that lose retained messages (restarted without persistence,
    or expiring them) while devices are still fetching.

    ``chunk_size`` must be the one the bundles were deployed with: a need names chunk positions in that
    index (a device checks every chunk's hash, so a mismatch is refused there, never installed). With
    ``publish`` the index and chunks are published again, retained, at start.
    """
    chunked = _chunk_all(bundles, chunk_size, "serve-bundles")
    with Deployer(options, Topics(prefix), observer, connect_timeout=connect_timeout) as deployer:
        for c in chunked:
            if publish:
                deployer.publish_bundle(c)
            else:
                deployer.offer(c)
            log.info("serving %s %s (bundle %s…, %d chunks)", c.manifest.name, c.manifest.version, c.bundle[:12],
                     len(c.index.chunks))  # fmt: skip
        stop.wait()
    return chunked


def clear_bundles(
    bundles: Iterable[Path],
    *,
    options: MqttOptions,
    prefix: str = "edgepack",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    keep: Iterable[Path] = (),
    connect_timeout: float = 10.0,
) -> dict[str, int]:
    """Remove ``bundles``' retained index and chunks from the broker, sparing chunks that the ``keep``
    bundles (still being fetched, say) share; returns bundle digest -> retained messages cleared.

    On MQTT 5 retained bundles expire with their command (``--ttl-hours``); on a 3.1.1 broker they stay
    until cleared. Commands are not touched: a device that has a command but no chunks asks with ``need``.
    """
    chunked = _chunk_all(bundles, chunk_size, "clear-bundles")
    spared = [chunk_bundle(Path(b), chunk_size) for b in keep]
    with Deployer(options, Topics(prefix), connect_timeout=connect_timeout) as deployer:
        return {c.bundle: deployer.clear_bundle(c, keep=spared) for c in chunked}


def _chunk_all(bundles: Iterable[Path], chunk_size: int, command: str) -> list[ChunkedBundle]:
    chunked = [chunk_bundle(Path(b), chunk_size) for b in bundles]
    if not chunked:
        raise ConfigError(f"{command} needs at least one bundle file")
    return chunked
