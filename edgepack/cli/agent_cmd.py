"""Device-side commands: ``serve`` and ``run`` (offline, one bundle), and ``agent install/status/rollback``.

Agent imports happen inside the commands, so a host without the agent extra still gets ``--help``.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.table import Table

from edgepack.cli import agent_trust_cmd
from edgepack.cli.console import console, err_console

TRUST_HELP = "Trust store directory the bundle must verify against ('edgepack trust init')."


def register(app: typer.Typer) -> None:
    agent = typer.Typer(
        help="The device agent: install bundles, show and roll back what it runs.", no_args_is_help=True
    )
    app.add_typer(agent, name="agent")
    agent_trust_cmd.register(agent)  # agent trust-update

    @app.command("serve")
    def serve_cmd(
        bundle: Path = typer.Argument(..., exists=True, dir_okay=False, help="Bundle to serve."),
        trust: Path = typer.Option(..., "--trust", help=TRUST_HELP),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; keep 127.0.0.1 unless you mean it."),
        port: int = typer.Option(8000, "--port", help="Port of the KServe v2 HTTP API."),
        token: str | None = typer.Option(None, "--token", envvar="EDGEPACK_TOKEN", help="Require this bearer token."),
        threads: int | None = typer.Option(None, "--threads", help="Runtime intra-op threads."),
        state: Path | None = typer.Option(None, "--state", help="State directory (default: a temporary one)."),
        insecure_listen: bool = typer.Option(
            False, "--insecure-listen", help="Allow a --host beyond loopback without a --token (trusted networks only)."
        ),
        listen_unix: Path | None = typer.Option(
            None, "--listen-unix", help="Also serve on this Unix-domain socket (mode 0600)."
        ),
        max_concurrent: int | None = typer.Option(
            None, "--max-concurrent-requests", help="Inference requests in flight before 503 (default: 4 per thread)."
        ),
        max_queued_mb: float | None = typer.Option(
            None, "--max-queued-mb", help="Body MiB held by requests in flight before 503 (default: derived)."
        ),
        grpc_port: int | None = typer.Option(
            None, "--grpc-port", help="Also serve KServe v2 gRPC on this port (default: HTTP only)."
        ),
    ) -> None:
        """Serve one bundle over the local KServe v2 API, offline (no broker).

        The API listens at once and answers not ready (503, naming the model) until the bundle has gone
        through the full install (verify, self-test on this machine).
        """
        import signal
        import threading

        from edgepack.agent.config import load_config
        from edgepack.agent.service import DeviceAgent
        from edgepack.bundle import read_info

        name = read_info(bundle).manifest.name
        with tempfile.TemporaryDirectory(prefix="edgepack-serve-") as tmp:
            config = load_config(
                None,
                {
                    "state_dir": str(state or tmp),
                    "trust_dir": str(trust),
                    "listen": f"{host}:{port}",
                    "token": token,
                    "runtime.threads": threads,
                    "insecure_listen": insecure_listen,
                    "listen_unix": str(listen_unix) if listen_unix else None,
                    "max_concurrent_requests": max_concurrent,
                    "max_queued_mb": max_queued_mb,
                    "grpc_port": grpc_port,
                },
            )
            agent = DeviceAgent(config)
            stop = threading.Event()
            try:
                agent.live.require(name)  # /v2/health/ready says 503 until this bundle serves
                handle = agent.start_api()
                agent.boot()
                result = agent.install(bundle)
                where = f"http://{handle.url}" + (f" and unix:{config.listen_unix}" if config.listen_unix else "")
                if handle.grpc is not None:
                    where += f" (gRPC on {handle.grpc.url})"
                err_console.print(
                    f"serving [bold]{result.name}[/] {result.version} on {where}/v2/models/{result.name} "
                    f"(self-test: {result.selftest or 'none'}); Ctrl-C stops"
                )
                if threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGTERM, lambda *_: stop.set())
                while not stop.wait(1.0):
                    pass
            except KeyboardInterrupt:
                pass
            finally:
                agent.close()

    @app.command("run")
    def run_cmd(
        bundle: Path = typer.Argument(..., exists=True, dir_okay=False, help="Bundle to run."),
        trust: Path = typer.Option(..., "--trust", help=TRUST_HELP),
        input_path: Path = typer.Option(
            ..., "--input", exists=True, help="Inputs: .npz keyed by input name, or .npy for one input."
        ),
        output: Path | None = typer.Option(None, "--output", help="Write the outputs here (.npz)."),
        threads: int | None = typer.Option(None, "--threads", help="Runtime intra-op threads."),
    ) -> None:
        """Run one inference (or one per sample) with a bundle, no server: verify, load, infer, print."""
        from edgepack.bundle import extract_bundle
        from edgepack.datasets import load_samples
        from edgepack.runtimes.base import RuntimeOptions, get_backend
        from edgepack.trust import TrustStore

        with tempfile.TemporaryDirectory(prefix="edgepack-run-") as tmp:
            manifest = extract_bundle(bundle, Path(tmp) / "bundle", TrustStore.load(trust))
            model = get_backend(manifest.runtime.name).load(
                Path(tmp) / "bundle" / manifest.model_file,
                inputs=list(manifest.inputs),
                outputs=list(manifest.outputs),
                execution=manifest.execution,
                options=RuntimeOptions(threads=threads),
            )
            try:
                samples = load_samples(input_path, manifest.inputs, what="--input")
                results = [model.infer(feed) for feed in samples.feeds]
            finally:
                model.close()
        outputs = {
            name: np.concatenate([r[name] for r in results]) if len(results) > 1 else results[0][name]
            for name in results[0]
        }
        table = Table(title=f"{manifest.name} {manifest.version} — {len(results)} inference(s)")
        for column in ("output", "dtype", "shape", "values"):
            table.add_column(column)
        for name, value in outputs.items():
            preview = np.array2string(value.ravel()[:8], precision=4, separator=", ")
            table.add_row(name, str(value.dtype), str(list(value.shape)), preview)
        console.print(table)
        labels = manifest.metadata.get("labels")
        first = next(iter(outputs.values()))
        if isinstance(labels, list) and first.ndim == 2 and first.shape[1] == len(labels):
            predicted = first.argmax(axis=1)
            console.print("top-1: " + ", ".join(str(labels[i]) for i in predicted[:16]))
            if samples.labels is not None and len(samples.labels) == len(predicted):
                correct = int((predicted == samples.labels.astype(predicted.dtype)).sum())
                console.print(
                    f"accuracy against the file's labels: {correct}/{len(predicted)} = {100 * correct / len(predicted):.2f}%"
                )
        if output is not None:
            np.savez(output, **outputs)
            console.print(f"wrote {output}")

    @agent.command("install")
    def install_cmd(
        bundle: Path = typer.Argument(..., exists=True, dir_okay=False, help="Bundle to install."),
        trust: Path | None = typer.Option(None, "--trust", help=TRUST_HELP + " " + STANDALONE_HELP),
        state: Path = typer.Option(..., "--state", help="The agent's state directory."),
        target: list[str] = typer.Option(
            [], "--target", help="Target(s) this device accepts; others are refused. " + STANDALONE_HELP
        ),
    ) -> None:
        """Install a bundle through the state machine: verify → stage (self-test) → switch → commit.

        When `edgepack agent run` holds --state, the daemon does the install (its trust store and targets);
        otherwise this command takes the state directory for itself.
        """
        from edgepack.agent.control import InstallRequest

        result = _in_daemon_or_here(
            state, InstallRequest(path=str(bundle.resolve())), trust, target, lambda agent: agent.install(bundle)
        )
        console.print(
            f"[green]committed[/] {result['name']} {result['version']} ({result['digest'][:12]}…){_where(result)} "
            f"timings {result['timings']}"
        )

    @agent.command("rollback")
    def rollback_cmd(
        name: str = typer.Argument(..., help="Model name to roll back to its kept previous bundle."),
        trust: Path | None = typer.Option(None, "--trust", help=TRUST_HELP + " " + STANDALONE_HELP),
        state: Path = typer.Option(..., "--state", help="The agent's state directory."),
    ) -> None:
        """Go back to the previous bundle of a model (the one explicit exception to 'versions only go forward').

        When `edgepack agent run` holds --state, the daemon does the rollback.
        """
        from edgepack.agent.control import RollbackRequest

        result = _in_daemon_or_here(state, RollbackRequest(name=name), trust, [], lambda agent: agent.rollback(name))
        console.print(f"[green]rolled back[/] {result['name']} to {result['version']}{_where(result)}")

    @agent.command("status")
    def status_cmd(
        state: Path = typer.Option(..., "--state", help="The agent's state directory."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Show what the device runs: per model the active and previous bundle, and recent installs.

        When `edgepack agent run` holds --state, this is the daemon's view (with what it serves now).
        """
        status = _status(state)
        if as_json:
            typer.echo(json.dumps(status, indent=2))
            return
        daemon = status.get("daemon")
        title = f"models in {state}" + (f" (daemon PID {daemon['pid']})" if daemon else "")
        table = Table(title=title)
        columns = ["model", "active", "previous", "highest seen"] + (["serving"] if daemon else [])
        for column in columns:
            table.add_column(column)
        for name, row in status["models"].items():
            cells = [
                name,
                row["active"]["version"] if row["active"] else "-",
                row["previous"]["version"] if row["previous"] else "-",
                row["highest_version"] or "-",
            ]
            if daemon:
                cells.append(row.get("serving") or "-")
            table.add_row(*cells)
        console.print(table)
        trust = status.get("trust")  # only a daemon's status has it (the store alone does not know its trust dir)
        if trust:
            expired = " [red]EXPIRED: serving, accepting nothing new[/]" if trust["expired"] else ""
            console.print(f"trust root version {trust['version']}, expires {trust['expires']}{expired}")
        for name, field in (status.get("field_data") or {}).get("models", {}).items():  # a daemon's drift
            drift = field.get("drift") or {}
            worst = ", ".join(f"{w['tensor']}[{w['channel']}] psi {w['psi']:.2f}" for w in drift.get("worst", [])[:2])
            line = f"drift {name}: {drift.get('level', 'off')}" + (f" ({worst})" if worst else "")
            console.print(line + (f" [red]field data disabled: {field['disabled']}[/]" if field.get("disabled") else ""))
        capture = (status.get("field_data") or {}).get("capture")
        if capture:
            console.print(f"capture: {capture['records']} record(s) waiting, {capture['bytes']} bytes, "
                          f"{capture['dropped']} dropped (buffer full), {capture['uploaded']} uploaded")  # fmt: skip
        for entry in status["recent_installs"]:
            console.print(
                f"{entry['action']} {entry['name']} {entry['version']}: {entry['outcome'] or entry['state']} {entry['reason'] or ''}"
            )
        for notice in status.get("notices", []):  # what the store repaired on its own: the operator should know
            console.print(f"[yellow]notice:[/] {notice}", highlight=False)


STANDALONE_HELP = "Used when no daemon (`edgepack agent run`) holds --state; a running daemon uses its own."


def _in_daemon_or_here(
    state: Path, request: Any, trust: Path | None, targets: list[str], work: Callable[[Any], Any]
) -> dict[str, Any]:
    """Run ``request`` in the daemon that holds ``state`` or, when none does, here under the store lock."""
    from edgepack.agent.config import load_config
    from edgepack.agent.control import ask_daemon
    from edgepack.agent.service import DeviceAgent
    from edgepack.errors import ConfigError, StoreLockedError

    reply = ask_daemon(state, request)
    if reply is not None:
        daemon = reply.get("daemon") or {}
        if trust is not None and Path(daemon.get("trust_dir", trust)).resolve() != trust.resolve():
            err_console.print(f"note: the daemon verified against its own trust store {daemon['trust_dir']}, not {trust}")
        return reply
    if trust is None:
        raise ConfigError(f"no daemon serves {state}; give --trust (the trust store bundles must verify against)")
    config = load_config(None, {"state_dir": str(state), "trust_dir": str(trust), "targets": targets or None})
    try:
        agent = DeviceAgent(config)  # takes the store lock, or StoreLockedError naming the holder
    except StoreLockedError:
        reply = ask_daemon(state, request)  # a daemon that was just starting may answer now
        if reply is not None:
            return reply
        raise
    try:
        for note in agent.installer.recover():  # safe: nobody else has the store
            err_console.print(f"recovered: {note}")
        return dataclasses.asdict(work(agent))
    finally:
        agent.close()


def _where(result: dict[str, Any]) -> str:
    daemon = result.get("daemon")
    return f" by the daemon (PID {daemon['pid']})" if daemon else ""


def _status(state: Path) -> dict[str, Any]:
    """The daemon's view when one holds ``state``; else the store's, under the lock (reading the store may
    repair it: a corrupt state.json is quarantined and rebuilt, so status is no exception to the lock)."""
    from edgepack.agent.control import StatusRequest, ask_daemon
    from edgepack.agent.service import describe_store
    from edgepack.agent.store import DeviceStore
    from edgepack.agent.store_lock import StoreLock
    from edgepack.errors import StoreLockedError

    reply = ask_daemon(state, StatusRequest())
    if reply is not None:
        return reply
    try:
        lock = StoreLock.acquire(state)
    except StoreLockedError:
        reply = ask_daemon(state, StatusRequest())  # a daemon that was just starting may answer now
        if reply is not None:
            return reply
        raise
    with lock:
        return describe_store(DeviceStore(state))
