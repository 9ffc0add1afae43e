"""``edgepack fleet …``: the device registry, rollouts with waves, gates and a journal, and rollbacks.

Every command has ``--json`` and the MQTT options of ``deploy`` (``mqtt_cmd``'s option constants);
``status``, ``pause`` and ``cancel`` only need the journal. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
import signal
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from edgepack.cli.console import console, err_console
from edgepack.cli.mqtt_cmd import BROKER, CA, CERT, PASSWORD, PREFIX, PROTOCOL, TLS_KEY, USERNAME, _operator_options
from edgepack.units import parse_size

JSON_OPT = typer.Option(False, "--json", help="Machine-readable output (JSON; JSON lines while a rollout runs).")
JOURNAL = typer.Option(None, "--journal", envvar="EDGEPACK_FLEET_JOURNAL",
                       help="Rollout journal (SQLite; default ~/.local/state/edgepack/fleet.sqlite).")  # fmt: skip
KEYS = typer.Option(..., "--key", help="Key with the trust store's 'command' role; repeatable.")
NODES = typer.Option([], "--node", help="Another node of a clustered broker whose retained messages are per node "
                     "(RabbitMQ): retained messages are written and read on every node; repeatable.")  # fmt: skip


def _journal(path: Path | None) -> Any:
    from edgepack.fleet.journal import Journal, default_journal

    return Journal(path or default_journal())


def _ago(when: datetime) -> str:
    seconds = (datetime.now(timezone.utc) - when).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(0, seconds):.0f}s ago"


def _health_cell(health: Any) -> str:
    from rich.markup import escape

    from edgepack.fleet.registry import health_problem

    if health is None:
        return "-"
    problem = health_problem(health)
    return "[green]ok[/]" if problem is None else f"[red]{escape(problem)}[/]"


def _drift_cell(record: Any) -> str:
    from rich.markup import escape

    from edgepack.fleet.registry import capture_summary, drift_summary

    colours = {"ok": "green", "warn": "yellow", "alarm": "red"}
    parts = [f"[{colours[lv]}]{escape(t)}[/]" if lv in colours else escape(t) for lv, t in drift_summary(record.models)]
    capture = capture_summary(record.capture)
    return "; ".join([*parts, *([escape(capture)] if capture else [])]) or "-"


def _nodes(urls: list[str], role: str, *tls: Any) -> list[Any]:
    """MQTT options for each ``--node`` (the same credentials and TLS as ``--broker``)."""
    return [_operator_options(url, role, *tls) for url in urls]


def _run_engine(
    journal: Any, rollout_id: str, options: Any, key: list[Path], as_json: bool, nodes: list[Any] | None = None
) -> Any:
    from edgepack.fleet.engine import RolloutEngine
    from edgepack.fleet.progress import JsonLinesObserver, RichRolloutObserver
    from edgepack.keys import SigningKey

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    observer = JsonLinesObserver() if as_json else RichRolloutObserver(err_console)
    engine = RolloutEngine(
        journal, rollout_id, options=options, keys=[SigningKey.load(k) for k in key], observer=observer,
        stop=stop.is_set, nodes=nodes,
    )  # fmt: skip
    rollout = engine.run()
    if stop.is_set() and rollout.status in ("running", "paused", "aborting"):
        err_console.print(f"stopped; 'edgepack fleet resume {rollout_id}' carries on where it was")
    return rollout


def _print_status(journal: Any, rollout: Any, as_json: bool, devices: bool = True) -> None:
    executions = journal.executions(rollout.id)
    counts = journal.counts(rollout.id)
    if as_json:
        data = {**rollout.to_json(), "counts": counts}
        if devices:
            data["devices"] = [e.to_json() for e in executions]
        typer.echo(json.dumps(data, indent=2))
        return
    if rollout.kind == "rollback":
        what = f"rollback of {rollout.model}{f' to {rollout.version}' if rollout.version else ''} on {rollout.selector}"
        console.print(f"rollback [bold]{rollout.id}[/]: {what} — [bold]{rollout.status}[/]"
                      f"{f'; {rollout.reason}' if rollout.reason else ''}")  # fmt: skip
    else:
        console.print(
            f"rollout [bold]{rollout.id}[/]: {rollout.model} {rollout.version} to {rollout.selector} — "
            f"[bold]{rollout.status}[/] (wave {rollout.wave + 1}){f'; {rollout.reason}' if rollout.reason else ''}"
        )
    console.print("  " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "  no device yet")
    if devices and executions:
        table = Table("device", "wave", "state", "attempts", "previous", "code", "reason")
        for e in executions:
            wave = "-" if e.wave is None else str(e.wave + 1)
            table.add_row(e.device, wave, e.state, str(e.attempts), e.previous_version or "-", e.code or "",
                          (e.reason or "")[:90])  # fmt: skip
        console.print(table)


def _print_rollback(model: str, outcomes: list[Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([vars(o) for o in outcomes], indent=2))
        return
    table = Table("device", "outcome", "from", "to", "reason", title=f"rollback of {model}")
    for o in outcomes:
        table.add_row(o.device, o.outcome, o.from_version or "-", o.to_version or "-", o.reason or "")
    console.print(table)


def register(app: typer.Typer) -> None:
    fleet = typer.Typer(help="Fleet: device registry, rollouts (waves, gates, journal), rollbacks.",
                        no_args_is_help=True)  # fmt: skip
    app.add_typer(fleet, name="fleet")
    from edgepack.cli import capture_cmd

    capture_cmd.register(fleet)  # fleet capture pull
    from edgepack.cli import fleet_identity_cmd  # ca, provision, provision-operator, broker-config

    fleet_identity_cmd.register(fleet)
    from edgepack.cli import fleet_trust_cmd  # trust push

    fleet_trust_cmd.register(fleet)

    @fleet.command("devices")
    def devices_cmd(
        group: str | None = typer.Option(None, "--group", help="Selector: site=lyon,class=orin or ids, or all."),
        listen: float = typer.Option(0.0, "--listen", help="Then listen this many seconds for live states "
                                     "(heartbeats; brokers without retained wildcard delivery)."),
        broker: str = BROKER, prefix: str = PREFIX, protocol: str = PROTOCOL, ca: Path | None = CA,
        cert: Path | None = CERT, tls_key: Path | None = TLS_KEY, username: str | None = USERNAME,
        password: str | None = PASSWORD, as_json: bool = JSON_OPT, node: list[str] = NODES,
    ) -> None:  # fmt: skip
        """List the devices from their retained states: online, last seen, labels, models, health."""
        from edgepack.fleet.registry import list_devices
        from edgepack.fleet.selectors import Selector

        options = _operator_options(broker, "fleet", protocol, ca, cert, tls_key, username, password)
        nodes = _nodes(node, "fleet", protocol, ca, cert, tls_key, username, password)
        found = list_devices(options, prefix=prefix, selector=Selector.parse(group) if group else None, nodes=nodes,
                             listen_s=listen)  # fmt: skip
        if as_json:
            typer.echo(json.dumps([r.to_json() for r in found], indent=2))
            return
        table = Table("device", "online", "last seen", "labels", "models (active / previous)", "health",
                      "drift / capture", "runtime", "agent", title=f"{len(found)} device(s)")  # fmt: skip
        for r in found:
            models = "; ".join(f"{n} {m.get('active') or '-'} / {m.get('previous') or '-'}" for n, m in r.models.items())
            table.add_row(
                r.device, "[green]yes[/]" if r.online else "[red]no[/]", _ago(r.last_seen),
                ",".join(f"{k}={v}" for k, v in sorted(r.labels.items())), models or "-",
                _health_cell(r.health), _drift_cell(r),
                "-" if r.runtime is None else str(r.runtime), r.agent_version or "-",
            )  # fmt: skip
        console.print(table)

    @fleet.command("forget")
    def forget_cmd(
        devices: list[str] = typer.Argument(..., help="Device ids whose retained state and command to clear."),
        broker: str = BROKER, prefix: str = PREFIX, protocol: str = PROTOCOL, ca: Path | None = CA,
        cert: Path | None = CERT, tls_key: Path | None = TLS_KEY, username: str | None = USERNAME,
        password: str | None = PASSWORD, as_json: bool = JSON_OPT, node: list[str] = NODES,
    ) -> None:  # fmt: skip
        """Clear retired devices' retained state and command (nobody waits for them any more)."""
        from edgepack.fleet.registry import forget_devices

        options = _operator_options(broker, "fleet", protocol, ca, cert, tls_key, username, password)
        known = forget_devices(devices, options, prefix=prefix,
                               nodes=_nodes(node, "fleet", protocol, ca, cert, tls_key, username, password))  # fmt: skip
        if as_json:
            typer.echo(json.dumps({"forgotten": known}, indent=2))
            return
        for device, had in known.items():
            console.print(f"forgot {device}" + ("" if had else " (it had no retained state)"))

    @fleet.command("rollout")
    def rollout_cmd(
        bundle: Path = typer.Argument(..., exists=True, dir_okay=False, help="Bundle (.epk) to roll out."),
        group: str = typer.Option(..., "--group", help="Selector: site=lyon,class=orin, device ids, or all."),
        waves: str = typer.Option("1,10%,50%,100%", "--waves", help="Cumulative wave sizes; the first is the canary."),
        rate: str | None = typer.Option(None, "--rate", help="Instead of waves: at most N/min devices notified."),
        exponential: str | None = typer.Option(None, "--exponential", help="Instead of waves: BASE,FACTOR per min."),
        success_gate: str = typer.Option("100%", "--success-gate", help="Share of a wave that must succeed."),
        abort_on: list[str] = typer.Option([], "--abort-on", help="TYPE:PCT:MIN_EXECUTED (failed|rejected|"
                                           "timed_out|all); repeatable."),
        timeout: str = typer.Option("10m", "--timeout", help="Per device, notified to result."),
        retries: int = typer.Option(0, "--retries", help="Retries of a failed or timed-out device."),
        soak: str = typer.Option("0s", "--soak", help="After commit, healthy this long before it counts."),
        rollback_on_abort: bool = typer.Option(False, "--rollback-on-abort", help="Roll updated devices back."),
        offline_wait: str = typer.Option("10m", "--offline-wait", help="Stay open this long for offline members."),
        rollout_id: str | None = typer.Option(None, "--id", help="Rollout id (default: generated)."),
        chunk_size: str = typer.Option("256k", "--chunk-size", help="Chunk size (e.g. 64k, 256k, 1M)."),
        ttl_hours: float = typer.Option(168.0, "--ttl-hours", help="Commands and the retained bundle expire after."),
        key: list[Path] = KEYS, journal_path: Path | None = JOURNAL,
        broker: str = BROKER, prefix: str = PREFIX, protocol: str = PROTOCOL, ca: Path | None = CA,
        cert: Path | None = CERT, tls_key: Path | None = TLS_KEY, username: str | None = USERNAME,
        password: str | None = PASSWORD, as_json: bool = JSON_OPT, node: list[str] = NODES,
    ) -> None:  # fmt: skip
        """Roll a bundle out to a group in waves (or at a rate) with gates, abort rules and a journal."""
        from edgepack.fleet.engine import create_rollout
        from edgepack.fleet.plan import (
            AbortRule,
            RolloutPlan,
            parse_duration,
            parse_exponential,
            parse_percent,
            parse_rate,
            parse_waves,
        )  # fmt: skip

        plan = RolloutPlan(
            waves=parse_waves(waves), rate_per_min=parse_rate(rate) if rate else None,
            exponential=parse_exponential(exponential) if exponential else None,
            success_gate=parse_percent(success_gate, "--success-gate"),
            abort_rules=[AbortRule.parse(a) for a in abort_on], device_timeout_s=parse_duration(timeout, "--timeout"),
            retries=retries, soak_s=parse_duration(soak, "--soak"), rollback_on_abort=rollback_on_abort,
            offline_wait_s=parse_duration(offline_wait, "--offline-wait"),
            chunk_size=parse_size(chunk_size, "--chunk-size"), ttl_s=ttl_hours * 3600,
        )  # fmt: skip
        options = _operator_options(broker, "rollout", protocol, ca, cert, tls_key, username, password)
        journal = _journal(journal_path)
        holder = journal.locked_by_other()
        if holder:
            from edgepack.errors import JournalLockedError

            raise JournalLockedError(f"rollout journal {journal.path} is in use by operator {holder}; only one "
                                     "operator drives a journal's rollouts (give another --journal)")  # fmt: skip
        rid = create_rollout(journal, bundle, selector=group, plan=plan, prefix=prefix, rollout_id=rollout_id)
        err_console.print(f"rollout [bold]{rid}[/] ({plan.describe()}); journal {journal.path}")
        nodes = _nodes(node, "rollout", protocol, ca, cert, tls_key, username, password)
        rollout = _run_engine(journal, rid, options, key, as_json, nodes)
        if not as_json:
            _print_status(journal, rollout, False, devices=True)
        if rollout.status != "completed" or any(
            e.state != "succeeded" for e in journal.executions(rid)
        ):
            raise typer.Exit(1)

    @fleet.command("resume")
    def resume_cmd(
        rollout_id: str | None = typer.Argument(None, help="Rollout id (default: the latest open one)."),
        key: list[Path] = KEYS, journal_path: Path | None = JOURNAL,
        broker: str = BROKER, protocol: str = PROTOCOL, ca: Path | None = CA,
        cert: Path | None = CERT, tls_key: Path | None = TLS_KEY, username: str | None = USERNAME,
        password: str | None = PASSWORD, as_json: bool = JSON_OPT, node: list[str] = NODES,
    ) -> None:  # fmt: skip
        """Carry a rollout on (after pause, or after the operator was stopped or killed)."""
        from edgepack.errors import FleetError

        journal = _journal(journal_path)
        rollout = journal.rollout(rollout_id) if rollout_id else journal.latest_open()
        if rollout is None:
            raise FleetError(f"no open rollout in {journal.path} to resume")
        if rollout.status == "paused":
            journal.request(rollout.id, "resume")
        holder = journal.locked_by_other()
        if holder:
            err_console.print(f"operator {holder} runs rollout {rollout.id}; it carries on")
            return
        options = _operator_options(broker, "rollout", protocol, ca, cert, tls_key, username, password)
        nodes = _nodes(node, "rollout", protocol, ca, cert, tls_key, username, password)
        if rollout.kind == "rollback":
            from edgepack.fleet.rollback import run_rollback
            from edgepack.keys import SigningKey

            outcomes = run_rollback(journal, rollout.id, options=options, keys=[SigningKey.load(k) for k in key],
                                    nodes=nodes)  # fmt: skip
            _print_rollback(rollout.model, outcomes, as_json)
            if any(o.outcome not in ("committed", "skipped") for o in outcomes):
                raise typer.Exit(1)
            return
        rollout = _run_engine(journal, rollout.id, options, key, as_json, nodes)
        if not as_json:
            _print_status(journal, rollout, False)
        if rollout.status != "completed":
            raise typer.Exit(1)

    def _request(action: str, rollout_id: str | None, journal_path: Path | None, as_json: bool) -> None:
        from edgepack.errors import FleetError

        journal = _journal(journal_path)
        rollout = journal.rollout(rollout_id) if rollout_id else journal.latest_open()
        if rollout is None:
            raise FleetError(f"no open rollout in {journal.path} to {action}")
        rollout = journal.request(rollout.id, action)
        holder = journal.locked_by_other()
        note = (f"operator {holder} carries it out" if holder
                else f"no operator runs it now; 'edgepack fleet resume {rollout.id}' carries it out")  # fmt: skip
        if as_json:
            typer.echo(json.dumps({"rollout": rollout.id, "request": action, "operator": holder}))
        else:
            console.print(f"asked rollout {rollout.id} to {action}; {note}")

    @fleet.command("pause")
    def pause_cmd(rollout_id: str | None = typer.Argument(None), journal_path: Path | None = JOURNAL,
                  as_json: bool = JSON_OPT) -> None:  # fmt: skip
        """Stop notifying new devices (those in flight finish)."""
        _request("pause", rollout_id, journal_path, as_json)

    @fleet.command("abort")
    def abort_cmd(rollout_id: str | None = typer.Argument(None), journal_path: Path | None = JOURNAL,
                  as_json: bool = JSON_OPT) -> None:  # fmt: skip
        """Abort: cancel queued devices, finish those in flight, roll back if the plan says so."""
        _request("abort", rollout_id, journal_path, as_json)

    @fleet.command("cancel")
    def cancel_cmd(rollout_id: str | None = typer.Argument(None), journal_path: Path | None = JOURNAL,
                   as_json: bool = JSON_OPT) -> None:  # fmt: skip
        """Cancel: like abort, never rolling back."""
        _request("cancel", rollout_id, journal_path, as_json)

    @fleet.command("status")
    def status_cmd(rollout_id: str | None = typer.Argument(None, help="Rollout id (default: list the recent)."),
                   journal_path: Path | None = JOURNAL, as_json: bool = JSON_OPT) -> None:  # fmt: skip
        """A rollout's state per device from the journal, or the recent rollouts."""
        journal = _journal(journal_path)
        if rollout_id:
            _print_status(journal, journal.rollout(rollout_id), as_json)
            return
        rollouts = journal.rollouts()
        if as_json:
            typer.echo(json.dumps([{**r.to_json(), "counts": journal.counts(r.id)} for r in rollouts], indent=2))
            return
        for rollout in rollouts:
            _print_status(journal, rollout, False, devices=False)

    @fleet.command("rollback")
    def rollback_cmd(
        group: str = typer.Option(..., "--group", help="Selector: site=lyon,class=orin, device ids, or all."),
        model: str = typer.Option(..., "--model", help="The model to roll back."),
        to: str | None = typer.Option(None, "--to", help="Only devices whose kept previous version is this."),
        timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for the devices' results."),
        rollback_id: str | None = typer.Option(None, "--id", help="Rollback id in the journal (default: generated)."),
        key: list[Path] = KEYS, journal_path: Path | None = JOURNAL,
        broker: str = BROKER, prefix: str = PREFIX, protocol: str = PROTOCOL,
        ca: Path | None = CA, cert: Path | None = CERT, tls_key: Path | None = TLS_KEY,
        username: str | None = USERNAME, password: str | None = PASSWORD, as_json: bool = JSON_OPT,
        node: list[str] = NODES,
    ) -> None:  # fmt: skip
        """Send signed rollback commands (journaled): each device goes back to the previous version it keeps;
        with --to, a device that does not hold that version is refused, saying what it holds."""
        from edgepack.fleet.rollback import rollback
        from edgepack.fleet.selectors import Selector
        from edgepack.keys import SigningKey

        options = _operator_options(broker, "rollback", protocol, ca, cert, tls_key, username, password)
        journal = _journal(journal_path)
        outcomes = rollback(options, selector=Selector.parse(group), model=model, to_version=to, prefix=prefix,
                            keys=[SigningKey.load(k) for k in key], timeout=timeout, journal=journal,
                            rollback_id=rollback_id,
                            nodes=_nodes(node, "rollback", protocol, ca, cert, tls_key, username, password))  # fmt: skip
        _print_rollback(model, outcomes, as_json)
        if any(o.outcome not in ("committed", "skipped") for o in outcomes):
            raise typer.Exit(1)
