"""``edgepack fleet trust push``: send the fleet a new trust root (see ``fleet/trust_push.py``)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgepack.cli.console import console
from edgepack.cli.mqtt_cmd import BROKER, CA, CERT, PASSWORD, PREFIX, PROTOCOL, TLS_KEY, USERNAME, _operator_options


def register(fleet: typer.Typer) -> None:
    trust = typer.Typer(help="Trust roots for the fleet: push a rotated root to groups.", no_args_is_help=True)
    fleet.add_typer(trust, name="trust")

    @trust.command("push")
    def push_cmd(
        directory: Path = typer.Argument(..., help="The operator's trust store ('edgepack trust rotate' wrote it)."),
        group: list[str] = typer.Option(..., "--group", help="Group to send it to (retained); repeatable."),
        since: int = typer.Option(1, "--since", help="Oldest root version to include (devices walk them in order)."),
        broker: str = BROKER, prefix: str = PREFIX, protocol: str = PROTOCOL,
        ca: Path | None = CA, cert: Path | None = CERT, tls_key: Path | None = TLS_KEY,
        username: str | None = USERNAME, password: str | None = PASSWORD,
    ) -> None:  # fmt: skip
        """Publish the trust root chain retained on each group's trust topic; devices apply only a valid N+1."""
        from edgepack.fleet.trust_push import push_trust
        from edgepack.trust import TrustStore

        store = TrustStore.load(directory)
        options = _operator_options(broker, "trust", protocol, ca, cert, tls_key, username, password)
        topics = push_trust(options, store, group, prefix=prefix, since=since)
        console.print(f"published trust root version {store.version} to {', '.join(topics)}")
