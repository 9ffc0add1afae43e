"""Device-side commands: ``serve`` and ``run`` (offline, one bundle), and ``agent install/status/rollback``.

Agent imports happen inside the commands, so a host without the agent extra still gets ``--help``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from edgepack.cli.console import console, err_console

TRUST_HELP = "Trust store directory the bundle must verify against ('edgepack trust init')."


def register(app: typer.Typer) -> None:
    agent = typer.Typer(
        help="The device agent: install bundles, show and roll back what it runs.", no_args_is_help=True
    )
    app.add_typer(agent, name="agent")

    @app.command("serve")
    def serve_cmd(
        bundle: Path = typer.Argument(..., exists=True, dir_okay=False, help="Bundle to serve."),
        trust: Path = typer.Option(..., "--trust", help=TRUST_HELP),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; keep 127.0.0.1 unless you mean it."),
        port: int = typer.Option(8000, "--port", help="Port of the KServe v2 HTTP API."),
        token: str | None = typer.Option(None, "--token", envvar="EDGEPACK_TOKEN", help="Require this bearer token."),
        threads: int | None = typer.Option(None, "--threads", help="Runtime intra-op threads."),
        state: Path | None = typer.Option(None, "--state", help="State directory (default: a temporary one)."),
    ) -> None:
        """Serve one bundle over the local KServe v2 API, offline (no broker).

        The bundle goes through the full install (verify, self-test on this machine) before it serves.
        """
        from edgepack.agent.config import load_config
        from edgepack.agent.service import DeviceAgent

        with tempfile.TemporaryDirectory(prefix="edgepack-serve-") as tmp:
            config = load_config(
                None,
                {
                    "state_dir": str(state or tmp),
                    "trust_dir": str(trust),
                    "listen": f"{host}:{port}",
                    "token": token,
                    "runtime.threads": threads,
                },
            )
            agent = DeviceAgent(config)
            agent.boot()
            result = agent.install(bundle)
            err_console.print(
                f"serving [bold]{result.name}[/] {result.version} on http://{config.listen}/v2/models/{result.name} "
                f"(self-test: {result.selftest or 'none'}); Ctrl-C stops"
            )
            try:
                agent.serve_forever()
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
        trust: Path = typer.Option(..., "--trust", help=TRUST_HELP),
        state: Path = typer.Option(..., "--state", help="The agent's state directory."),
        target: list[str] = typer.Option([], "--target", help="Target(s) this device accepts; others are refused."),
    ) -> None:
        """Install a bundle through the state machine: verify → stage (self-test) → switch → commit."""
        from edgepack.agent.install import Installer
        from edgepack.agent.live import LiveModels
        from edgepack.agent.store import DeviceStore
        from edgepack.trust import TrustStore

        store = DeviceStore(state)
        live = LiveModels()
        installer = Installer(store, live, TrustStore.load(trust), device_targets=set(target) or None)
        installer.recover()
        try:
            result = installer.install(bundle)
        finally:
            live.close_all()
        console.print(
            f"[green]committed[/] {result.name} {result.version} ({result.digest[:12]}…) timings {result.timings}"
        )

    @agent.command("rollback")
    def rollback_cmd(
        name: str = typer.Argument(..., help="Model name to roll back to its kept previous bundle."),
        trust: Path = typer.Option(..., "--trust", help=TRUST_HELP),
        state: Path = typer.Option(..., "--state", help="The agent's state directory."),
    ) -> None:
        """Go back to the previous bundle of a model (the one explicit exception to 'versions only go forward')."""
        from edgepack.agent.install import Installer
        from edgepack.agent.live import LiveModels
        from edgepack.agent.store import DeviceStore
        from edgepack.trust import TrustStore

        live = LiveModels()
        try:
            result = Installer(DeviceStore(state), live, TrustStore.load(trust)).rollback(name)
        finally:
            live.close_all()
        console.print(f"[green]rolled back[/] {result.name} to {result.version}")

    @agent.command("status")
    def status_cmd(
        state: Path = typer.Option(..., "--state", help="The agent's state directory."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Show what the device runs: per model the active and previous bundle, and recent installs."""
        from edgepack.agent.service import describe_store
        from edgepack.agent.store import DeviceStore

        status = describe_store(DeviceStore(state))
        if as_json:
            typer.echo(json.dumps(status, indent=2))
            return
        table = Table(title=f"models in {state}")
        for column in ("model", "active", "previous", "highest seen"):
            table.add_column(column)
        for name, row in status["models"].items():
            table.add_row(
                name,
                row["active"]["version"] if row["active"] else "-",
                row["previous"]["version"] if row["previous"] else "-",
                row["highest_version"] or "-",
            )
        console.print(table)
        for entry in status["recent_installs"]:
            console.print(
                f"{entry['action']} {entry['name']} {entry['version']}: {entry['outcome'] or entry['state']} {entry['reason'] or ''}"
            )
