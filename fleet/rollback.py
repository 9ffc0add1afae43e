"""``edgepack fleet rollback --group SEL --model NAME [--to VERSION]``: signed rollbacks, journaled.

What a device can go back to is what it keeps: the agent's store holds per model the **active** bundle and
at most one **previous** bundle (``agent/install.py``: an install keeps the bundle it replaced; a rollback
makes the previous one active and keeps none, since the bundle rolled back from was the reason for it).
So per device, from its retained state:

- no ``--to``: a device with a previous version gets a rollback to it; one without is ``skipped`` (never
  updated, or already rolled back: its active version is below its highest);
- ``--to VERSION``: a device whose previous version is VERSION gets a rollback; one already running it is
  ``skipped``; any other is **refused** with what it holds and why VERSION cannot be reached (the agent
  takes only versions above its highest, so an older build must be re-released under a higher version).
  A device that answers with another version than VERSION (its state changed meanwhile) is ``failed``.

Like a rollout, the rollback is a journal row (``kind`` ``rollback``, ``fleet/journal.py``): each device's
decision and signed command are committed before anything is published, the results are written as they
come, and ``edgepack fleet status`` shows it. After a kill, ``edgepack fleet resume ID`` publishes the same
stored commands again (same ids: a device that ran one says so) and waits for the rest. Each command goes
on the device's own ``devices/ID/cmd`` topic; results come only from its own events; every retained command
is cleared at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from edgepack.errors import FleetError
from edgepack.fleet import commands
from edgepack.fleet.deploy import Deployer, DeviceProgress
from edgepack.fleet.journal import Execution, Journal
from edgepack.fleet.registry import DeviceRecord, records
from edgepack.fleet.selectors import Selector
from edgepack.keys import SigningKey
from edgepack.mqtt import MqttOptions
from edgepack.protocol import DEFAULT_COMMAND_TTL, SignedCommand, Topics

OFFLINE_GRACE_S = 10.0


@dataclass
class RollbackOutcome:
    device: str
    outcome: str  # committed, failed, rejected, timeout, offline, skipped, refused
    from_version: str | None
    to_version: str | None
    reason: str | None = None


def decide(record: DeviceRecord, model: str, to_version: str | None) -> tuple[str | None, str]:
    """``(None, to)`` when the device gets a rollback to ``to``; else ``(skipped|refused, why)``."""
    status = record.models.get(model)
    if status is None:
        return ("refused" if to_version else "skipped"), f"does not run {model}"
    active, previous, highest = status.get("active"), status.get("previous"), status.get("highest_version")
    if to_version is not None:
        if active == to_version:
            return "skipped", f"already runs {model} {to_version}"
        if previous == to_version:
            return None, to_version
        held = f"active {active or '-'}, " + (f"previous {previous}" if previous else "no previous version")
        return "refused", (
            f"does not hold {model} {to_version} (it keeps {held}): a device keeps one previous bundle, none "
            f"after a rollback, and installs only versions above its highest ({highest or active or '-'}); to "
            f"run {to_version}'s model again, release it under a higher version and roll that out"
        )
    if previous:
        return None, previous
    if highest and active and highest != active:
        return "skipped", (f"already rolled back (runs {active}, below its highest {highest}); the agent keeps no "
                           "bundle to go further back to")  # fmt: skip
    return "skipped", f"keeps no previous version of {model} (only {active or 'nothing'})"


def create_rollback(
    journal: Journal, *, selector: str, model: str, to_version: str | None = None, prefix: str = "edgepack",
    timeout_s: float = 120.0, ttl_s: float = DEFAULT_COMMAND_TTL.total_seconds(), rollback_id: str | None = None,
) -> str:  # fmt: skip
    """A new manual rollback in the journal (it runs with :func:`run_rollback`)."""
    Selector.parse(selector)
    plan = {"kind": "rollback", "to": to_version, "timeout_s": timeout_s, "ttl_s": ttl_s}
    what = f"rollback of {model}" + (f" to {to_version}" if to_version else "") + f" on {selector}"
    return journal.create_rollout(
        selector=selector, bundle_path="", bundle="", model=model, version=to_version or "", prefix=prefix,
        plan=plan, rollout_id=rollback_id, kind="rollback", reason=what,
    )  # fmt: skip


def run_rollback(
    journal: Journal, rollback_id: str, *, options: MqttOptions, keys: list[SigningKey], connect_timeout: float = 10.0,
    nodes: list[MqttOptions] | None = None,
) -> list[RollbackOutcome]:  # fmt: skip
    """Drive a journaled rollback to its end (a fresh one, or one a killed operator left); takes the journal's
    operator lock for the while."""
    if not keys:
        raise FleetError("a rollback needs a key with the trust store's 'command' role (--key KEY)")
    journal.lock()
    try:
        row = journal.rollout(rollback_id)
        if row.kind != "rollback":
            raise FleetError(f"{rollback_id} is a rollout, not a rollback; 'edgepack fleet resume' runs it")
        if row.status not in ("completed", "aborted", "canceled"):
            _run(journal, row, options, keys, connect_timeout, nodes or [])
        return outcomes(journal, rollback_id)
    finally:
        journal.unlock()


def _run(
    journal: Journal, row: Any, options: MqttOptions, keys: list[SigningKey], connect_timeout: float,
    nodes: list[MqttOptions],
) -> None:  # fmt: skip
    topics = Topics(row.prefix)
    to_version = row.plan.get("to")
    ttl = timedelta(seconds=float(row.plan.get("ttl_s") or DEFAULT_COMMAND_TTL.total_seconds()))
    timeout = float(row.plan.get("timeout_s") or 120.0)
    with Deployer(options, topics, connect_timeout=connect_timeout, nodes=nodes) as deployer:
        deployer.sync()
        execs = {e.device: e for e in journal.executions(row.id)}
        if not execs:  # fresh: decide per device and store the commands, in one transaction, then publish
            picked = records(deployer, Selector.parse(row.selector))
            with journal.transaction() as db:
                for joined, record in enumerate(picked):
                    e = journal.add_device(db, row.id, record.device, joined)
                    active = (record.models.get(row.model) or {}).get("active")
                    verdict, why = decide(record, row.model, to_version)
                    if verdict is not None:
                        journal.set_execution(db, e, state="canceled", code=verdict, reason=why,
                                              previous_version=active, target=to_version)  # fmt: skip
                        continue
                    signed = commands.rollback(row.model, record.device, keys, ttl, journal.next_command_seq(db))
                    journal.set_execution(
                        db, e, state="rolling_back", reason=f"rolling back from {active} to {why}",
                        previous_version=active, rollback_id=signed.command.id, rollback=signed.model_dump_json(),
                        notified_at=time.time(), attempts=1, target=why,
                    )  # fmt: skip
            execs = {e.device: e for e in journal.executions(row.id)}
        waiting = {d: e for d, e in execs.items() if e.state == "rolling_back" and e.rollback}
        for e in waiting.values():  # fresh, or the same stored command again after a kill (same id)
            deployer.send(SignedCommand.model_validate_json(e.rollback or ""), timeout=None)
        deadline = time.monotonic() + timeout
        for device, e in waiting.items():
            remaining = max(0.1, deadline - time.monotonic())
            progress = deployer.wait(e.rollback_id or "", [device], remaining, offline_grace=OFFLINE_GRACE_S)[device]
            state, code, reason = _settle(progress, e, deployer, row.model)
            with journal.transaction() as db:
                journal.set_execution(db, e, state=state, code=code, reason=reason)
        infos = [deployer.retract(e.rollback_id or "", topics.device_command(e.device)) for e in execs.values()
                 if e.rollback_id]  # fmt: skip
        deployer.wait_all(infos, 30)
    counts = journal.counts(row.id)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no device matched"
    with journal.transaction() as db:
        journal.set_rollout(db, row.id, status="completed", reason=f"rollback done: {summary}")


def _settle(progress: DeviceProgress, e: Execution, deployer: Deployer, model: str) -> tuple[str, str | None, str]:
    """The journal state of one device's rollback from what it answered."""
    target = e.target
    if progress.outcome == "committed":
        if progress.version and target and progress.version != target:
            return "failed", "other_version", f"went back to {progress.version}, not {target} (its state changed)"
        return "rolled_back", None, f"back on {progress.version or target}"
    if progress.outcome == "rejected" and progress.code == "replayed":  # it had run this command before a kill
        state = deployer.states.get(e.device)
        status = state.models.get(model) if state else None
        if status is not None and status.active == target:
            return "rolled_back", None, f"back on {target} (the device had run this command already)"
    if progress.outcome in ("timeout", "offline"):
        return "timed_out", progress.outcome, progress.reason or "no result"
    return "failed", progress.code or progress.outcome, progress.reason or progress.outcome or "failed"


def outcomes(journal: Journal, rollback_id: str) -> list[RollbackOutcome]:
    """A journaled rollback's per-device outcomes, in the shape ``edgepack fleet rollback`` prints."""
    out = []
    for e in journal.executions(rollback_id):
        outcome = {"rolled_back": "committed", "timed_out": "timeout", "rolling_back": "pending"}.get(e.state, e.state)
        if e.state == "canceled":
            outcome = e.code or "skipped"
        out.append(RollbackOutcome(e.device, outcome, e.previous_version, e.target, e.reason))
    return sorted(out, key=lambda o: o.device)


def rollback(
    options: MqttOptions, *, selector: Selector | str, model: str, keys: list[SigningKey], journal: Journal,
    to_version: str | None = None, prefix: str = "edgepack", timeout: float = 120.0,
    ttl: timedelta = DEFAULT_COMMAND_TTL, connect_timeout: float = 10.0, rollback_id: str | None = None,
    nodes: list[MqttOptions] | None = None,
) -> list[RollbackOutcome]:  # fmt: skip
    """Create a journaled rollback and run it; the per-device outcomes."""
    text = selector.text if isinstance(selector, Selector) else selector
    rid = create_rollback(journal, selector=text, model=model, to_version=to_version, prefix=prefix,
                          timeout_s=timeout, ttl_s=ttl.total_seconds(), rollback_id=rollback_id)  # fmt: skip
    return run_rollback(journal, rid, options=options, keys=keys, connect_timeout=connect_timeout, nodes=nodes)
