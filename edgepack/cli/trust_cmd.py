"""``edgepack trust``: create and change a device trust store."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from edgepack.cli.console import console
from edgepack.keys import VerifyKey
from edgepack.trust import ROLES, TrustStore


def register(app: typer.Typer) -> None:
    trust = typer.Typer(help="Create and change the trust store a device verifies bundles with.", no_args_is_help=True)
    app.add_typer(trust, name="trust")

    @trust.command("init")
    def init(
        directory: Path = typer.Argument(..., help="Trust store directory to create."),
        key: list[Path] = typer.Option(..., "--key", help="A public key (.pub) to trust; repeat for several."),
        threshold: int = typer.Option(1, "--threshold", help="How many of the keys must sign (k of n)."),
    ) -> None:
        """Create a trust store that trusts the given public keys, needing THRESHOLD of them to sign."""
        store = TrustStore.init(directory, key, threshold=threshold)
        _show(store)

    @trust.command("add")
    def add(
        directory: Path = typer.Argument(..., help="Trust store directory."),
        key: Path = typer.Option(..., "--key", help="Public key (.pub) to add, e.g. when rotating keys."),
        role: list[str] = typer.Option(list(ROLES), "--role", help="Role(s) the key holds: bundle, command."),
    ) -> None:
        """Trust one more key (key rotation: add the new key, re-sign, then revoke the old one)."""
        store = TrustStore.load(directory)
        store.add_key(VerifyKey.load(key), key.stem, role)
        _show(store)

    @trust.command("revoke")
    def revoke(
        directory: Path = typer.Argument(..., help="Trust store directory."),
        keyid: str = typer.Argument(..., help="Key id to revoke (or its first 8+ characters)."),
    ) -> None:
        """Revoke a key: bundles signed only by it are refused from now on."""
        store = TrustStore.load(directory)
        full = store.revoke(keyid)
        console.print(f"revoked {full}")
        _show(store)

    @trust.command("show")
    def show(directory: Path = typer.Argument(..., help="Trust store directory.")) -> None:
        """List the trusted keys, their roles, thresholds and revocations."""
        _show(TrustStore.load(directory))


def _show(store: TrustStore) -> None:
    table = Table(title=f"trust store {store.directory}")
    for column in ("key id", "name", "roles", "state"):
        table.add_column(column)
    for kid, trusted in sorted(store.keys.items()):
        state = "[red]revoked[/]" if kid in store.revoked else "trusted"
        table.add_row(kid, trusted.name, ", ".join(trusted.roles), state)
    console.print(table)
    console.print("thresholds: " + ", ".join(f"{r} {k}-of-n" for r, k in sorted(store.thresholds.items())))
