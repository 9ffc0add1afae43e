"""The rollout engine: one operator process driving a journaled rollout to its end.

``edgepack fleet rollout BUNDLE --group SEL …`` creates a rollout in the journal (``fleet/journal.py``)
and runs :class:`RolloutEngine`; ``edgepack fleet resume ROLLOUT`` (or re-running) runs it again after a
kill. Each step of the engine's loop, in one journal transaction, committed before anything is published:

1. the devices' **events and states** that arrived (only from each device's own topics) move their
   executions on: ``notified → downloading → installing → soaking → succeeded``, or ``failed`` /
   ``rejected`` / ``timed_out`` / ``canceled`` with the device's code and reason; a state that shows the
   bundle active also counts as the commit (a result lost while the operator was down is not waited for);
2. **requests** left by ``pause`` / ``resume`` / ``abort`` / ``cancel`` are carried out;
3. **membership**: a device whose retained state matches the selector and is not yet in the rollout
   joins it ``queued`` (devices that join the group while the rollout is open get the bundle too);
4. **timeouts, soak ends, retries**;
5. **abort rules** and the **success gate** of the finished wave;
6. **dispatch**: the next devices of the current wave (or as many as the rate allows) that are online get
   a fresh signed install command on their own ``devices/ID/cmd`` topic, stored in the journal first;
   devices that are offline wait ``queued`` and are sent it when their state says they are back.

Aborting cancels the queued devices, retracts the commands not yet taken, waits for the devices
already installing, then (``--rollback-on-abort``) sends a signed rollback to every device that
committed the new version, which ends ``rolled_back`` once its state shows the previous version again.
When the rollout closes, every retained command it published is cleared, so a device appearing later
finds nothing to act on by surprise.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from edgepack.errors import FleetError
from edgepack.fleet import commands
from edgepack.fleet.deploy import Deployer
from edgepack.fleet.journal import IN_FLIGHT, Execution, Journal, Rollout
from edgepack.fleet.plan import RolloutPlan
from edgepack.fleet.registry import health_problem, state_health
from edgepack.fleet.selectors import Selector
from edgepack.keys import SigningKey
from edgepack.mqtt import MqttOptions
from edgepack.protocol import (
    AcceptedEvent,
    DeviceState,
    ProgressEvent,
    RejectedEvent,
    ResultEvent,
    SignedCommand,
    Topics,
)
from edgepack.transfer import ChunkedBundle, chunk_bundle

log = logging.getLogger(__name__)

EXECUTED = ("succeeded", "failed", "rejected", "timed_out")
DONE = (*EXECUTED, "canceled", "rolled_back")
INSTALL_PHASES = ("downloaded", "verify", "stage", "switch", "commit")


@dataclass
class Snapshot:
    """What a progress display shows after each step."""

    rollout: str
    status: str
    reason: str | None
    wave: int
    waves: list[str]
    counts: dict[str, int]
    total: int
    failures: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)
    held_bytes: int = 0


class RolloutObserver:
    """What the engine tells as it goes; the default tells nothing."""

    def transition(self, rollout: str, device: str | None, state: str, code: str | None, reason: str | None) -> None:
        """A device's execution (or, device None, the rollout) changed state; already in the journal."""

    def snapshot(self, snapshot: Snapshot) -> None:
        """The counts after a step that changed something."""

    def close(self) -> None:
        """The engine stopped."""


class RolloutEngine:
    """Drives one rollout of a journal until it closes (or the process is stopped: resume carries on)."""

    def __init__(
        self,
        journal: Journal,
        rollout_id: str,
        *,
        options: MqttOptions,
        keys: list[SigningKey],
        observer: RolloutObserver | None = None,
        connect_timeout: float = 10.0,
        tick_s: float = 0.25,
        stop: Callable[[], bool] | None = None,
        nodes: list[MqttOptions] | None = None,
    ) -> None:
        if not keys:
            raise FleetError("a rollout needs a key with the trust store's 'command' role (--key KEY)")
        self.journal = journal
        self.rollout_id = rollout_id
        self.options = options
        self.nodes = list(nodes or [])  # a cluster's other nodes (fleet/deploy.py: per-node retained stores)
        self.keys = keys
        self.observer = observer or RolloutObserver()
        self.connect_timeout = connect_timeout
        self.tick_s = tick_s
        self.stop = stop or (lambda: False)
        self._inbox: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self._execs: dict[str, Execution] = {}
        self._actions: list[Callable[[], Any]] = []
        self._notes: list[tuple[str | None, str, str | None, str | None]] = []
        self._idle_since: float | None = None
        self._held: dict[str, int] = {}
        self._changed = True

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> Rollout:
        """Take the journal's operator lock and drive the rollout until it closes; returns its final row."""
        self.journal.lock()
        try:
            rollout = self.journal.rollout(self.rollout_id)
            if rollout.status in ("completed", "aborted", "canceled"):
                return rollout
            if rollout.kind != "rollout":
                raise FleetError(f"{rollout.id} is a manual {rollout.kind}, not a rollout (fleet/rollback.py runs it)")
            self.plan = RolloutPlan.from_json(rollout.plan)
            self.ttl = timedelta(seconds=self.plan.ttl_s)
            self.selector = Selector.parse(rollout.selector)
            self.chunked = self._load_bundle(rollout)
            self._execs = {e.device: e for e in self.journal.executions(self.rollout_id)}
            topics = Topics(rollout.prefix)
            self.topics = topics
            deployer = Deployer(
                self.options, topics, connect_timeout=self.connect_timeout,
                on_state=lambda d, s: self._inbox.put(("state", d, s)),
                on_event=lambda d, e: self._inbox.put(("event", d, e)), nodes=self.nodes,
            )  # fmt: skip
            with deployer:
                self.deployer = deployer
                if not rollout.published:
                    deployer.publish_bundle(self.chunked, expiry_s=int(self.plan.ttl_s))
                    with self.journal.transaction() as db:
                        self.journal.set_rollout(db, self.rollout_id, published=1)
                else:
                    deployer.offer(self.chunked)  # answer needs; the retained copy is on the broker already
                deployer.sync()
                self._resend_in_flight()
                while not self.stop():
                    if self._step():
                        break
                    self._wait()
            return self.journal.rollout(self.rollout_id)
        finally:
            self.observer.close()
            self.journal.unlock()

    def _load_bundle(self, rollout: Rollout) -> ChunkedBundle:
        path = Path(rollout.bundle_path)
        if not path.exists():
            raise FleetError(f"rollout {rollout.id} ships {path}, which is gone; put the bundle back to go on")
        chunked = chunk_bundle(path, self.plan.chunk_size)
        if chunked.bundle != rollout.bundle:
            raise FleetError(
                f"{path} is no longer the bundle rollout {rollout.id} ships ({rollout.model} {rollout.version}, "
                f"{rollout.bundle[:12]}…); put that bundle back to go on"
            )
        return chunked

    def _wait(self) -> None:
        try:
            item = self._inbox.get(timeout=self.tick_s)
        except queue.Empty:
            return
        self._inbox.put(item)  # handled by the next step, with whatever else has arrived

    def _step(self) -> bool:
        """One step; True when the rollout has closed."""
        messages = []
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        closing: str | None = None
        with self.journal.transaction() as db:
            self.db = db
            rollout = self.journal.rollout(self.rollout_id)
            self.rollout = rollout
            for kind, device, message in messages:
                if kind == "event":
                    self._on_event(device, message)
                else:
                    self._on_state(device, message)
            self._requests()
            if self.rollout.status in ("running", "paused"):
                self._membership()
            self._clocks()
            if self.rollout.status in ("running", "paused"):
                self._abort_rules()
            if self.rollout.status == "running":
                self._dispatch()
            if self.rollout.status == "aborting":
                self._aborting()
            closing = self._closing()
        self._flush()
        if closing is not None:
            self._close(closing)
            return True
        return False

    def _flush(self) -> None:
        actions, self._actions = self._actions, []
        for action in actions:
            action()
        notes, self._notes = self._notes, []
        for device, state, code, reason in notes:
            self.observer.transition(self.rollout_id, device, state, code, reason)
        if notes or self._changed:
            self._changed = False
            self.observer.snapshot(self.snapshot())

    # --- transitions -----------------------------------------------------------------------------

    def _set(self, e: Execution, state: str, *, code: str | None = None, reason: str | None = None, **more: Any) -> None:
        self.journal.set_execution(self.db, e, state=state, code=code, reason=reason, **more)
        self._notes.append((e.device, state, code, reason))

    def _set_rollout(self, **fields: Any) -> None:
        self.journal.set_rollout(self.db, self.rollout_id, **fields)
        for key, value in fields.items():
            setattr(self.rollout, key, value)
        if "status" in fields:
            self._notes.append((None, fields["status"], None, fields.get("reason")))
        self._changed = True

    def _on_event(self, device: str, event: Any) -> None:
        e = self._execs.get(device)
        if e is None or event.command_id is None:
            return
        if e.state == "rolling_back" and event.command_id == e.rollback_id:
            if isinstance(event, ResultEvent) and event.outcome == "committed":
                self._set(e, "rolled_back", reason=f"back on {event.version or e.previous_version}")
            elif isinstance(event, ResultEvent) or (isinstance(event, RejectedEvent) and self._command_topic(event)):
                self._set(e, "failed", code=event.code, reason=f"rollback failed: {event.reason}")
            return
        if e.state not in IN_FLIGHT or event.command_id != e.command_id:
            return  # an earlier attempt's news, or a device that has ended already
        if isinstance(event, AcceptedEvent):
            return
        if isinstance(event, ProgressEvent):
            self._held[device] = event.held_bytes
            if event.phase in INSTALL_PHASES and e.state != "installing":
                self._set(e, "installing", reason=event.phase)
            elif event.phase in ("index", "download") and e.state == "notified":
                self._set(e, "downloading")
        elif isinstance(event, ResultEvent):
            if event.outcome == "committed":
                self._committed(e, f"committed {event.version}")
            elif event.outcome == "superseded":
                self._set(e, "canceled", code="superseded", reason=event.reason)
            else:  # rolled_back: the install state machine refused it on the device; failed: before install
                self._failed(e, "failed", event.code, event.reason or event.outcome)
        elif isinstance(event, RejectedEvent) and self._command_topic(event):
            if event.code == "replayed":  # resent after a restart: the device had run it already
                if self._runs_ours(self.deployer.states.get(device)):
                    self._committed(e, "committed (the device had run this command already)")
                else:
                    self._failed(e, "failed", "replayed", f"the device had run this command already: {event.reason}")
            else:
                self._set(e, "rejected", code=event.code, reason=event.reason)

    def _on_state(self, device: str, state: DeviceState | None) -> None:
        e = self._execs.get(device)
        if e is None:
            return
        self._changed = True
        if e.state in IN_FLIGHT and self._runs_ours(state):
            self._committed(e, "committed (the device's state shows the bundle active)")
        elif e.state == "rolling_back" and state is not None and not self._runs_ours(state):
            model = state.models.get(self.rollout.model)
            if model is not None and model.active == e.previous_version:
                self._set(e, "rolled_back", reason=f"back on {e.previous_version}")
        elif e.state == "soaking" and state is not None and state.online and not self._runs_ours(state):
            model = state.models.get(self.rollout.model)
            self._set(e, "failed", code="soak", reason=f"soak: the device went to {model.active if model else None}")
        elif e.state == "soaking":
            problem = health_problem(self._health(device))
            if problem:
                self._set(e, "failed", code="soak", reason=f"soak: {problem}")

    def _runs_ours(self, state: DeviceState | None) -> bool:
        model = state.models.get(self.rollout.model) if state is not None else None
        return model is not None and model.bundle == self.rollout.bundle

    def _command_topic(self, event: RejectedEvent) -> bool:
        match = self.topics.parse(event.topic)
        return match is not None and match.kind in ("device_cmd", "group_cmd")

    def _committed(self, e: Execution, reason: str) -> None:
        now = time.time()
        if self.plan.soak_s > 0:
            self._set(e, "soaking", reason=f"{reason}; soaking {self.plan.soak_s:g} s", committed_at=now)
        else:
            self._set(e, "succeeded", reason=reason, committed_at=now)

    def _failed(self, e: Execution, state: str, code: str | None, reason: str | None) -> None:
        """``failed`` or ``timed_out``, or queued again while retries remain."""
        if e.attempts <= self.plan.retries and self.rollout.status in ("running", "paused"):
            self._set(e, "queued", code=code, reason=f"retry {e.attempts + 1} after {state}: {reason}")
        else:
            self._set(e, state, code=code, reason=reason)

    # --- the step's parts ------------------------------------------------------------------------

    def _requests(self) -> None:
        request = self.rollout.request
        if not request:
            return
        status = self.rollout.status
        if request == "pause" and status == "running":
            self._set_rollout(status="paused", reason="paused on request", request=None)
        elif request == "resume" and status == "paused":
            self._set_rollout(status="running", reason="resumed on request", request=None)
        elif request == "abort" and status in ("running", "paused"):
            self._set_rollout(request=None)
            self._abort("aborted on request")
        elif request == "cancel" and status in ("running", "paused", "aborting"):
            self._set_rollout(request=None)
            self._abort("canceled on request", cancel=True)
        else:
            self._set_rollout(request=None)

    def _membership(self) -> None:
        states = dict(self.deployer.states)
        joined = len(self._execs)
        for device in sorted(states):
            state = states[device]
            if device in self._execs or not self.selector.matches(device, state.labels, state.groups):
                continue
            self.journal.add_device(self.db, self.rollout_id, device, joined)
            self._execs[device] = Execution(
                self.rollout_id, device, joined, None, "queued", None, None, 0, None, None, None, None, None,
                None, None, time.time(),
            )  # fmt: skip
            self._notes.append((device, "queued", None, None))
            joined += 1

    def _clocks(self) -> None:
        now = time.time()
        timeout = self.plan.device_timeout_s
        for e in self._execs.values():
            if e.state in IN_FLIGHT and e.notified_at and now - e.notified_at > timeout:
                offline = not self._online(e.device)
                why = "the device is offline" if offline else f"no result within {timeout:g} s"
                self._failed(e, "timed_out", "timeout", why)
            elif e.state == "rolling_back" and e.notified_at and now - e.notified_at > timeout:
                self._set(e, "failed", code="timeout", reason=f"rollback: no result within {timeout:g} s")
            elif e.state == "soaking" and e.committed_at and now - e.committed_at >= self.plan.soak_s:
                state = self.deployer.states.get(e.device)
                health = self._health(e.device)
                problem = health_problem(health)
                if state is None or not state.online:
                    self._set(e, "failed", code="soak", reason="soak: the device was offline at the end of the soak")
                elif not self._runs_ours(state):
                    self._set(e, "failed", code="soak", reason="soak: the device no longer runs the bundle")
                elif problem:
                    self._set(e, "failed", code="soak", reason=f"soak: {problem}")
                elif health is None:  # an agent that reports no health: judged on online and active only
                    self._set(e, "succeeded", reason=f"online on the bundle for the {self.plan.soak_s:g} s soak "
                              "(the device reports no health)")  # fmt: skip
                else:
                    self._set(e, "succeeded", reason=f"healthy for the {self.plan.soak_s:g} s soak")

    def _abort_rules(self) -> None:
        counts = self._counts()
        executed = sum(counts.get(s, 0) for s in EXECUTED)
        for rule in self.plan.abort_rules:
            bad = sum(counts.get(s, 0) for s in rule.states())
            if executed >= rule.min_executed and executed and bad * 100 / executed >= rule.percent:
                self._abort(f"abort rule {rule}: {bad} of {executed} executed devices {rule.type}")
                return

    def _dispatch(self) -> None:
        retry = [e for e in self._execs.values() if e.state == "queued" and e.wave is not None]
        fresh = [e for e in self._execs.values() if e.state == "queued" and e.wave is None]
        for e in retry:
            if self._online(e.device):
                self._notify(e, e.wave)
        online_fresh = [e for e in fresh if self._online(e.device)]
        if self.plan.rate_based:
            self._dispatch_rate(online_fresh)
            return
        waves = self.plan.waves
        wave = self.rollout.wave
        target = waves[wave].size(len(self._execs))
        dispatched = sum(1 for e in self._execs.values() if e.wave is not None)
        for e in online_fresh[: max(0, target - dispatched)]:
            self._notify(e, wave)
            dispatched += 1
        if wave + 1 >= len(waves):
            return
        members = [e for e in self._execs.values() if e.wave == wave]
        filled = dispatched >= target or not any(self._online(e.device) for e in fresh if e.state == "queued")
        if not filled or any(e.state not in DONE for e in members):
            return
        executed = [e for e in members if e.state in EXECUTED]
        ok = sum(1 for e in executed if e.state == "succeeded")
        rate = 100.0 * ok / len(executed) if executed else 100.0
        if rate + 1e-9 < self.plan.success_gate:
            self._abort(
                f"wave {wave + 1} ({waves[wave]}): {ok} of {len(executed)} succeeded ({rate:.0f}%), below the "
                f"{self.plan.success_gate:g}% success gate"
            )
            return
        self._set_rollout(wave=wave + 1, reason=f"wave {wave + 1} passed ({ok}/{len(executed)}); wave {wave + 2}")
        self._dispatch()

    def _dispatch_rate(self, online_fresh: list[Execution]) -> None:
        now = time.time()
        rate = self.plan.rate_per_min or 0.0
        if self.plan.exponential:
            base, factor = self.plan.exponential
            succeeded = sum(1 for e in self._execs.values() if e.state == "succeeded")
            rate, threshold = base, base
            while succeeded >= threshold:
                rate *= factor
                threshold += rate
        recent = sum(1 for e in self._execs.values() if e.notified_at and now - e.notified_at < 60)
        for e in online_fresh[: max(0, int(rate) - recent)]:
            self._notify(e, 0)

    def _notify(self, e: Execution, wave: int | None) -> None:
        signed = commands.install(self.chunked, e.device, self.keys, self.ttl, self.journal.next_command_seq(self.db))
        state = self.deployer.states.get(e.device)
        model = state.models.get(self.rollout.model) if state else None
        previous = e.previous_version if e.attempts else (model.active if model else None)
        self._set(
            e, "notified", wave=wave, attempts=e.attempts + 1, command_id=signed.command.id,
            command=signed.model_dump_json(), previous_version=previous, notified_at=time.time(),
        )  # fmt: skip
        self._actions.append(lambda: self.deployer.send(signed, timeout=None))

    def _abort(self, reason: str, *, cancel: bool = False) -> None:
        log.warning("rollout %s: %s", self.rollout_id, reason)
        self._set_rollout(status="aborting", reason=reason, request="cancel" if cancel else None)
        for e in self._execs.values():
            if e.state == "queued":
                self._set(e, "canceled", reason="the rollout stopped before this device was notified")
            elif e.state == "notified" and not self._online(e.device):
                self._set(e, "canceled", reason="offline; its command was retracted when the rollout stopped")
                self._actions.append(self._retract(e))

    def _aborting(self) -> None:
        busy = [e for e in self._execs.values() if e.state in IN_FLIGHT or e.state == "rolling_back"]
        if busy:
            return
        cancel = self.rollout.request == "cancel"
        if self.plan.rollback_on_abort and not cancel:
            for e in self._execs.values():
                if e.state in ("succeeded", "soaking") and e.rollback_id is None:
                    if not e.previous_version:
                        self._set(e, e.state, reason="no previous version to roll back to; left on the new one")
                        e.rollback_id = "-"
                        continue
                    signed = commands.rollback(
                        self.rollout.model, e.device, self.keys, self.ttl, self.journal.next_command_seq(self.db)
                    )
                    self._set(
                        e, "rolling_back", reason=f"rolling back to {e.previous_version}",
                        rollback_id=signed.command.id, rollback=signed.model_dump_json(), notified_at=time.time(),
                    )  # fmt: skip
                    self._actions.append(lambda s=signed: self.deployer.send(s, timeout=None))
            if any(e.state == "rolling_back" for e in self._execs.values()):
                return
        for e in self._execs.values():
            if e.state == "soaking":  # stopped before the soak ended: it runs the bundle, unproven
                self._set(e, "succeeded", reason="committed; the soak was cut short by the abort")

    def _closing(self) -> str | None:
        """The final status when the rollout is over now, else None."""
        status = self.rollout.status
        states = [e.state for e in self._execs.values()]
        if status == "aborting":
            if any(s in IN_FLIGHT or s in ("rolling_back", "soaking") for s in states):
                return None
            return "canceled" if self.rollout.request == "cancel" else "aborted"
        if status != "running":
            return None
        if not self.plan.rate_based and self.rollout.wave + 1 < len(self.plan.waves):
            return None
        if not self._execs or any(s in IN_FLIGHT or s == "soaking" for s in states):
            return None
        queued = [e for e in self._execs.values() if e.state == "queued"]
        if not queued:
            return "completed"
        if any(self._online(e.device) for e in queued):
            return None
        now = time.monotonic()
        self._idle_since = self._idle_since or now
        if now - self._idle_since < self.plan.offline_wait_s:
            return None
        for e in queued:
            self._set(e, "canceled", reason=f"offline for the {self.plan.offline_wait_s:g} s the rollout waited")
        return "completed"

    def _close(self, status: str) -> None:
        """Clear every retained command the rollout published (acknowledged), then record the end."""
        infos = [self._retract(e)() for e in self._execs.values() if e.command_id or e.rollback_id]
        self.deployer.client.wait_published([i for i in infos if i is not None], 60)
        counts = self._counts()
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        with self.journal.transaction() as db:
            self.db = db
            reason = self.rollout.reason if status != "completed" else f"completed: {summary}"
            self._set_rollout(status=status, reason=reason, request=None)
        self._flush()

    def _retract(self, e: Execution) -> Callable[[], Any]:
        topic = self.topics.device_command(e.device)
        command_id = e.rollback_id if e.rollback_id not in (None, "-") else e.command_id
        return lambda: self.deployer.retract(command_id or "", topic)

    def _resend_in_flight(self) -> None:
        """After a restart: publish again the stored command of every device in flight (same id: a device
        that has it already ignores it or says it ran it; one that never got it runs it now)."""
        for e in self._execs.values():
            stored = e.rollback if e.state == "rolling_back" else e.command if e.state in IN_FLIGHT else None
            if stored:
                self.deployer.send(SignedCommand.model_validate_json(stored), timeout=None)
                if e.notified_at:
                    e.notified_at = max(e.notified_at, time.time() - self.plan.device_timeout_s / 2)

    # --- reading ---------------------------------------------------------------------------------

    def _health(self, device: str) -> Any:
        return state_health(self.deployer.states.get(device), self.deployer.state_extras.get(device, {}).get("health"))

    def _online(self, device: str) -> bool:
        state = self.deployer.states.get(device)
        return bool(state and state.online)

    def _counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self._execs.values():
            counts[e.state] = counts.get(e.state, 0) + 1
        return counts

    def snapshot(self) -> Snapshot:
        failures = [
            (e.device, e.state, e.code, e.reason)
            for e in self._execs.values()
            if e.state in ("failed", "rejected", "timed_out")
        ]
        return Snapshot(
            rollout=self.rollout_id, status=self.rollout.status, reason=self.rollout.reason, wave=self.rollout.wave,
            waves=[str(w) for w in self.plan.waves] if not self.plan.rate_based else ["rate"],
            counts=self._counts(), total=len(self._execs), failures=failures,
            held_bytes=sum(self._held.values()),
        )  # fmt: skip


def create_rollout(
    journal: Journal, bundle: Path, *, selector: str, plan: RolloutPlan, prefix: str = "edgepack",
    rollout_id: str | None = None,
) -> str:  # fmt: skip
    """Write a new rollout of ``bundle`` to ``selector`` into the journal (it runs with :class:`RolloutEngine`)."""
    Selector.parse(selector)
    chunked = chunk_bundle(bundle, plan.chunk_size)
    return journal.create_rollout(
        selector=selector, bundle_path=str(Path(bundle).resolve()), bundle=chunked.bundle,
        model=chunked.manifest.name, version=chunked.manifest.version, prefix=prefix, plan=plan.to_json(),
        rollout_id=rollout_id,
    )  # fmt: skip
