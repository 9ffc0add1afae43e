"""``edgepack keys``: make Ed25519 signing keys."""

from __future__ import annotations

from pathlib import Path

import typer

from edgepack.cli.console import console
from edgepack.keys import SigningKey


def register(app: typer.Typer) -> None:
    keys = typer.Typer(help="Make and inspect signing keys.", no_args_is_help=True)
    app.add_typer(keys, name="keys")

    @keys.command("generate")
    def generate(
        out: Path = typer.Option(..., "--out", help="Directory to write NAME.key and NAME.pub into."),
        name: str = typer.Option("edgepack", "--name", help="Base name of the two key files."),
    ) -> None:
        """Make a new Ed25519 key pair: NAME.key (private, mode 0600; keep it secret) and NAME.pub.

        Give NAME.pub to devices ('edgepack trust init'); sign bundles with NAME.key.
        """
        key = SigningKey.generate()
        private_path, public_path = key.save(out, name)
        console.print(f"private key  {private_path}  (mode 0600 — keep it secret)")
        console.print(f"public key   {public_path}")
        console.print(f"key id       {key.key_id}")
