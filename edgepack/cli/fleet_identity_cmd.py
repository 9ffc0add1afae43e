"""``edgepack fleet ca|provision|provision-operator|broker-config``: device identity and broker access.

The fleet CA signs one certificate per device (CN = device id) and per operator; ``broker-config`` turns what it
issued into a mosquitto configuration and ACL (``fleet/ca.py``, ``fleet/provision.py``, ``fleet/broker_config.py``;
``docs/broker-acl.md``). Registered on the ``fleet`` group by ``fleet_cmd.register``; needs only ``cryptography``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from edgepack.cli.console import console

CA_DIR = typer.Option(..., "--ca", help="Fleet CA directory (made by 'edgepack fleet ca init').")
OUT = typer.Option(..., "--out", "-o", help="Directory to write into.")
DAYS = typer.Option(1095, "--days", help="Days the certificate is valid (default three years).")
FORCE = typer.Option(False, "--force", help="Replace an identity already in --out.")


def register(fleet: typer.Typer) -> None:
    ca_app = typer.Typer(help="The fleet CA that signs device, operator and broker certificates.", no_args_is_help=True)
    fleet.add_typer(ca_app, name="ca")
    broker_app = typer.Typer(help="Broker configuration from the fleet CA's record.", no_args_is_help=True)
    fleet.add_typer(broker_app, name="broker-config")

    @ca_app.command("init")
    def ca_init(
        out: Path = OUT,
        name: str = typer.Option("edgepack fleet CA", "--name", help="The CA certificate's common name."),
        days: int = typer.Option(3650, "--days", help="Days the CA is valid (default ten years)."),
    ) -> None:
        """Create the fleet CA (and the operator CA) in OUT; keep OUT offline: it mints identities."""
        from edgepack.fleet.ca import FleetCA

        ca = FleetCA.init(out, name=name, days=days)
        console.print(f"fleet CA [bold]{name}[/] in {ca.directory} (valid to {ca.cert.not_valid_after_utc:%Y-%m-%d})")

    @ca_app.command("list")
    def ca_list(
        ca: Path = CA_DIR, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")
    ) -> None:
        """Every certificate the fleet CA issued: kind, CN, groups, validity."""
        from edgepack.fleet.ca import FleetCA

        issued = FleetCA.load(ca).issued()
        if as_json:
            rows = [
                {"serial": f"{i.serial:x}", "cn": i.cn, "kind": i.kind, "labels": i.labels, "groups": i.groups,
                 "not_after": i.not_after.isoformat()}
                for i in issued
            ]  # fmt: skip
            typer.echo(json.dumps(rows, indent=2))
            return
        table = Table("kind", "cn", "groups", "valid to", "serial")
        for i in issued:
            table.add_row(i.kind, i.cn, ", ".join(i.groups), f"{i.not_after:%Y-%m-%d}", f"{i.serial:x}"[:16])
        console.print(table)

    @fleet.command("provision")
    def provision(
        device_id: str = typer.Argument(..., help="The device id: the certificate's CN and the agent's device_id."),
        ca: Path = CA_DIR,
        out: Path = OUT,
        label: list[str] = typer.Option(
            [],
            "--label",
            help="Label KEY=VALUE, as in the device's agent.toml (its groups come from them); repeatable.",
        ),
        days: int = DAYS,
        force: bool = FORCE,
    ) -> None:
        """Issue DEVICE_ID's key and certificate into OUT (device.pem, device.key, ca.pem) for its firmware image."""
        from edgepack.agent.daemon import parse_labels
        from edgepack.fleet.ca import FleetCA
        from edgepack.fleet.provision import provision_device

        done = provision_device(FleetCA.load(ca), device_id, out, labels=parse_labels(label), days=days, force=force)
        console.print(f"device [bold]{device_id}[/] (groups: {', '.join(done.groups) or 'none'}) → {out}")
        console.print(
            f"build its image with: scripts/build-image … --device-id {device_id} --device-cert {done.cert} "
            f"--device-key {done.key} --ca {done.ca}; then 'edgepack fleet broker-config mosquitto' again"
        )

    @fleet.command("provision-operator")
    def provision_operator_cmd(
        name: str = typer.Argument(..., help="The operator's name: its certificate's CN."),
        ca: Path = CA_DIR,
        out: Path = OUT,
        days: int = DAYS,
        force: bool = FORCE,
    ) -> None:
        """Issue an operator certificate into OUT (operator.pem, operator.key, ca.pem) for deploy and fleet."""
        from edgepack.fleet.ca import FleetCA
        from edgepack.fleet.provision import provision_operator

        done = provision_operator(FleetCA.load(ca), name, out, days=days, force=force)
        console.print(
            f"operator [bold]{name}[/] → {out}; use it with --broker mqtts://BROKER:8884 --ca {done.ca} "
            f"--cert {done.cert} --tls-key {done.key}"
        )

    @fleet.command("revoke")
    def revoke(
        cn: str = typer.Argument(..., help="The device id (or operator name) whose certificates to revoke."),
        ca: Path = CA_DIR,
    ) -> None:
        """Revoke every certificate of CN (a lost, retired or compromised device); then rerun broker-config."""
        from edgepack.fleet.ca import FleetCA

        revoked = FleetCA.load(ca).revoke(cn)
        console.print(
            f"revoked {len(revoked)} certificate(s) of [bold]{cn}[/]; run 'edgepack fleet broker-config mosquitto' "
            "again and reload mosquitto (kill -HUP) so that the broker refuses them"
        )

    @broker_app.command("mosquitto")
    def mosquitto(
        ca: Path = CA_DIR,
        out: Path = OUT,
        host: list[str] = typer.Option(
            ..., "--host", help="A name or address clients reach the broker by; repeatable."
        ),
        port: int = typer.Option(8883, "--port", help="TLS listener for devices."),
        operator_port: int = typer.Option(8884, "--operator-port", help="TLS listener for operators."),
        bind: str | None = typer.Option(None, "--bind", help="Address the listeners bind to (default: all)."),
        prefix: str = typer.Option("edgepack", "--prefix", help="Topic prefix (the agents' broker.prefix)."),
        install_dir: Path | None = typer.Option(
            None, "--install-dir", help="Where the files will be on the broker host (default: OUT)."
        ),
        operator_forget: bool = typer.Option(
            False,
            "--operator-forget",
            help="Let operators clear device states ('fleet forget'); see docs/broker-acl.md.",
        ),
    ) -> None:
        """Write mosquitto.conf, the ACL and the broker certificate for the devices and operators the CA issued."""
        from edgepack.fleet.broker_config import write_mosquitto
        from edgepack.fleet.ca import FleetCA

        files = write_mosquitto(
            FleetCA.load(ca), out, hosts=host, port=port, operator_port=operator_port, bind=bind, prefix=prefix,
            install_dir=install_dir, operator_forget=operator_forget,
        )  # fmt: skip
        console.print(
            f"{files.conf}, {files.acl}: {len(files.devices)} devices, operators {', '.join(files.operators)}; "
            f"broker certificate {'kept' if files.reused_cert else 'issued'} ({files.cert})"
        )
        console.print(f"run: mosquitto -c {files.conf}   (reload the ACL after provisioning: kill -HUP <mosquitto>)")
