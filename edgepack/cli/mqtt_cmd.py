"""MQTT delivery commands: ``agent run`` (the device daemon), ``deploy``, ``serve-bundles`` and
``clear-bundles`` (the operator) and ``broker``.

``agent run`` joins the ``agent`` group that ``agent_cmd`` registers (found through
``app.registered_groups``). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import inspect
import json
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.table import Table

from edgepack.cli.console import console, err_console
from edgepack.units import parse_size

if TYPE_CHECKING:
    from edgepack.mqtt import MqttOptions


# options the operator and device commands share
BROKER = typer.Option(..., "--broker", envvar="EDGEPACK_BROKER", help="mqtt://HOST[:PORT] or mqtts://…")
PREFIX = typer.Option("edgepack", "--prefix", help="Topic prefix.")
PROTOCOL = typer.Option("auto", "--protocol", help="auto (MQTT 5, else 3.1.1), 3.1.1 or 5.")
CA = typer.Option(None, "--ca", help="CA certificate for mqtts://.")
CERT = typer.Option(None, "--cert", help="Client certificate for mqtts://.")
TLS_KEY = typer.Option(None, "--tls-key", help="Client certificate's private key.")
USERNAME = typer.Option(None, "--username", help="Broker user name.")
PASSWORD = typer.Option(None, "--password", envvar="EDGEPACK_BROKER_PASSWORD", help="Broker password.")


def _operator_options(
    broker: str,
    role: str,
    protocol: str,
    ca: Path | None,
    cert: Path | None,
    tls_key: Path | None,
    username: str | None,
    password: str | None,
) -> MqttOptions:
    """The MQTT options of an operator command (a fresh client id per run: two runs never kick each other off)."""
    from edgepack.mqtt import MqttOptions

    return MqttOptions(
        url=broker, client_id=f"edgepack-{role}-{uuid.uuid4().hex[:8]}", protocol=protocol, ca=ca, cert=cert,
        key=tls_key, username=username, password=password,
    )  # fmt: skip


def _derive_options(command: Callable[..., None]) -> None:
    """Give ``agent run`` one option per setting that ``agent/config.py`` marks as a flag (``flag_specs``): the
    options are derived from the config's fields, never spelled out again here."""
    from edgepack.agent.config import flag_specs

    parameters = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", exists=True, dir_okay=False, help="agent.toml to read."),
            annotation=Optional[Path],
        )
    ]
    for spec in flag_specs():
        annotation: Any = list[spec.kind] if spec.multiple else Optional[spec.kind]
        default: Any = [] if spec.multiple else None
        parameters.append(
            inspect.Parameter(
                spec.dest,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(default, *spec.name.split(" "), envvar=spec.envvar, help=spec.help),
                annotation=annotation,
            )
        )
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": type(None)}


def _agent_group(app: typer.Typer) -> typer.Typer:
    for info in app.registered_groups:
        if info.name == "agent" and info.typer_instance is not None:
            return info.typer_instance
    agent = typer.Typer(help="The device agent.", no_args_is_help=True)
    app.add_typer(agent, name="agent")
    return agent


def register(app: typer.Typer) -> None:
    agent = _agent_group(app)

    def run_cmd(config: Path | None = None, **flags: Any) -> None:
        """Run the device agent: local API from the store at once; commands and bundles over MQTT."""
        from edgepack.agent.daemon import DaemonFlags, daemon_config, run

        cfg = daemon_config(config, DaemonFlags(**flags))
        err_console.print(
            f"device [bold]{cfg.device_id or '(no id: joins no broker)'}[/]: local API on http://{cfg.listen}, "
            f"broker {cfg.broker.url or '(none: offline)'}; Ctrl-C stops"
        )
        run(cfg)

    _derive_options(run_cmd)
    agent.command("run")(run_cmd)

    @app.command("deploy")
    def deploy_cmd(
        bundle: Path = typer.Argument(..., exists=True, dir_okay=False, help="Bundle (.epk) to deploy."),
        device: str | None = typer.Option(None, "--device", help="Deploy to this device."),
        group: str | None = typer.Option(None, "--group", help="Deploy to this group (a label: NAME or KEY=VALUE)."),
        broker: str = BROKER,
        key: list[Path] = typer.Option(..., "--key", help="Key with the trust store's 'command' role; repeatable."),
        wait: bool = typer.Option(False, "--wait", help="Follow the devices to a result, with progress."),
        timeout: float = typer.Option(600.0, "--timeout", help="Seconds --wait waits for results."),
        offline_grace: float = typer.Option(
            30.0, "--offline-grace", help="--wait to a group: stop waiting for a member offline this many seconds."
        ),
        chunk_size: str = typer.Option("256k", "--chunk-size", help="Chunk size (e.g. 64k, 256k, 1M)."),
        ttl_hours: float = typer.Option(
            168.0, "--ttl-hours", help="The command (and the retained bundle) expire after."
        ),
        prefix: str = PREFIX,
        protocol: str = PROTOCOL,
        ca: Path | None = CA,
        cert: Path | None = CERT,
        tls_key: Path | None = TLS_KEY,
        username: str | None = USERNAME,
        password: str | None = PASSWORD,
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
        capture: Path | None = typer.Option(
            None,
            "--capture",
            exists=True,
            dir_okay=False,
            help="With --device: also turn data capture of the bundle's model on (TOML, docs/capture.md).",
        ),
        journal_path: Path | None = typer.Option(
            None,
            "--journal",
            envvar="EDGEPACK_FLEET_JOURNAL",
            help="Fleet journal whose counter orders commands (default ~/.local/state/edgepack/fleet.sqlite).",
        ),
    ) -> None:
        """Publish a bundle once and a signed install command to a device or a group."""
        from edgepack.fleet.deploy import DeployObserver, RichProgressObserver, deploy
        from edgepack.fleet.journal import Journal, default_journal
        from edgepack.keys import SigningKey

        journal = Journal(journal_path or default_journal())
        try:
            seq = journal.next_command_seq()  # ordered by the operators' shared counter, not a clock
        finally:
            journal.close()

        options = _operator_options(broker, "deploy", protocol, ca, cert, tls_key, username, password)
        if capture is not None:  # the capture opt-in goes out first: the new model captures from its first request
            from edgepack.bundle import read_info
            from edgepack.cli.capture_cmd import read_capture_settings
            from edgepack.errors import ConfigError
            from edgepack.fleet.capture import send_capture_config

            if device is None:
                raise ConfigError("--capture configures one device: give --device (or use `fleet capture set`)")
            send_capture_config(options, device, read_info(bundle).manifest.name, read_capture_settings(capture),
                                [SigningKey.load(k) for k in key], prefix=prefix)  # fmt: skip
        observer = RichProgressObserver(err_console) if wait and not as_json else DeployObserver()
        report = deploy(
            bundle,
            options=options,
            keys=[SigningKey.load(k) for k in key],
            device=device,
            group=group,
            prefix=prefix,
            wait=wait,
            timeout=timeout,
            chunk_size=parse_size(chunk_size, "--chunk-size"),
            ttl=timedelta(hours=ttl_hours),
            observer=observer,
            offline_grace=offline_grace,
            seq=seq,
        )
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "command_id": report.command_id,
                        "bundle": report.bundle,
                        "to": report.to,
                        "upload_s": round(report.upload_s, 4),
                        "devices": {d: vars(p) for d, p in report.devices.items()},
                    },
                    indent=2,
                )
            )
        else:
            console.print(f"sent command {report.command_id} to {report.to} (upload {report.upload_s:.2f} s)")
            if report.devices:
                table = Table(title=f"deploy to {report.to}")
                for column in ("device", "outcome", "version", "reason"):
                    table.add_column(column)
                for name, progress in sorted(report.devices.items()):
                    table.add_row(name, progress.outcome or "-", progress.version or "-", progress.reason or "")
                console.print(table)
        if wait and not report.ok:
            raise typer.Exit(1)

    @app.command("serve-bundles")
    def serve_bundles_cmd(
        bundles: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="Bundles (.epk) to serve."),
        broker: str = BROKER,
        chunk_size: str = typer.Option(
            "256k", "--chunk-size", help="The chunk size the bundles were deployed with (deploy's default: 256k)."
        ),
        publish: bool = typer.Option(False, "--publish", help="Publish the bundles again, retained, at start."),
        prefix: str = PREFIX,
        protocol: str = PROTOCOL,
        ca: Path | None = CA,
        cert: Path | None = CERT,
        tls_key: Path | None = TLS_KEY,
        username: str | None = USERNAME,
        password: str | None = PASSWORD,
    ) -> None:
        """Answer devices' requests for missing chunks of these bundles until stopped (Ctrl-C, SIGTERM):
        a bundle server for brokers that lose retained messages while devices are still fetching."""
        import signal
        import threading

        from edgepack.fleet.deploy import serve_bundles

        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        options = _operator_options(broker, "serve", protocol, ca, cert, tls_key, username, password)
        err_console.print(f"serving {len(bundles)} bundle(s) on {broker} (prefix {prefix}); Ctrl-C stops")
        served = serve_bundles(
            bundles, options=options, prefix=prefix, chunk_size=parse_size(chunk_size, "--chunk-size"),
            publish=publish, stop=stop,
        )  # fmt: skip
        err_console.print(f"stopped serving {', '.join(f'{c.manifest.name} {c.manifest.version}' for c in served)}")

    @app.command("clear-bundles")
    def clear_bundles_cmd(
        bundles: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="Bundles (.epk) to clear."),
        broker: str = BROKER,
        keep: list[Path] = typer.Option(
            [], "--keep", exists=True, dir_okay=False, help="Spare the chunks this bundle shares; repeatable."
        ),
        chunk_size: str = typer.Option("256k", "--chunk-size", help="The chunk size the bundles were deployed with."),
        prefix: str = PREFIX,
        protocol: str = PROTOCOL,
        ca: Path | None = CA,
        cert: Path | None = CERT,
        tls_key: Path | None = TLS_KEY,
        username: str | None = USERNAME,
        password: str | None = PASSWORD,
    ) -> None:
        """Remove deployed bundles' retained index and chunks from the broker (a 3.1.1 broker keeps them
        until cleared)."""
        from edgepack.fleet.deploy import clear_bundles

        options = _operator_options(broker, "clear", protocol, ca, cert, tls_key, username, password)
        size = parse_size(chunk_size, "--chunk-size")
        cleared = clear_bundles(bundles, options=options, prefix=prefix, chunk_size=size, keep=keep)
        for digest, count in cleared.items():
            console.print(f"cleared bundle {digest[:12]}… ({count} retained message(s))")

    @app.command("broker")
    def broker_cmd(
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 for the whole network)."),
        port: int = typer.Option(1883, "--port", help="Port to listen on."),
    ) -> None:
        """Run the embedded MQTT 3.1.1 broker (amqtt) in the foreground, for single-site use and demos."""
        from edgepack.broker import EmbeddedBroker

        err_console.print(f"embedded MQTT broker on mqtt://{host}:{port}; Ctrl-C stops")
        EmbeddedBroker(host, port).serve_forever()
