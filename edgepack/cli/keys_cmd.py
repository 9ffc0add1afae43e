"""``edgepack keys``: make Ed25519 signing keys, encrypted at rest when asked.

Registering this group also installs the terminal prompt that :mod:`edgepack.keys` falls back on when a
command loads an encrypted key and neither ``$EDGEPACK_KEY_PASSPHRASE`` nor ``$EDGEPACK_KEY_PASSPHRASE_FILE``
is set.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

import typer

from edgepack import keys as keymod
from edgepack.cli.console import console
from edgepack.errors import KeyPassphraseError
from edgepack.keys import PASSPHRASE_ENV, SigningKey, read_passphrase_file


def prompt_passphrase(path: Path) -> bytes | None:
    """Ask on the terminal for the passphrase of ``path``; None when there is no terminal to ask on."""
    if not sys.stdin.isatty():
        return None
    return getpass.getpass(f"passphrase for {path}: ").encode() or None


def new_passphrase(passphrase_file: Path | None) -> bytes:
    """The passphrase to encrypt a new key with: --passphrase-file, $EDGEPACK_KEY_PASSPHRASE, or the prompt."""
    if passphrase_file is not None:
        return read_passphrase_file(passphrase_file)
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if not sys.stdin.isatty():
        raise KeyPassphraseError(
            f"--encrypt needs a passphrase: give --passphrase-file FILE or set {PASSPHRASE_ENV} (no terminal to ask on)"
        )
    first = getpass.getpass("passphrase for the new key: ")
    if first != getpass.getpass("again: "):
        raise KeyPassphraseError("the two passphrases differ; nothing was written")
    if not first:
        raise KeyPassphraseError("an empty passphrase would not protect the key; give a real one")
    return first.encode()


def register(app: typer.Typer) -> None:
    keymod.set_passphrase_prompt(prompt_passphrase)
    keys = typer.Typer(help="Make and inspect signing keys.", no_args_is_help=True)
    app.add_typer(keys, name="keys")

    @keys.command("generate")
    def generate(
        out: Path = typer.Option(..., "--out", help="Directory to write NAME.key and NAME.pub into."),
        name: str = typer.Option("edgepack", "--name", help="Base name of the two key files."),
        encrypt: bool = typer.Option(
            False, "--encrypt", help="Encrypt NAME.key with a passphrase (prompt, $EDGEPACK_KEY_PASSPHRASE or file)."
        ),
        passphrase_file: Path | None = typer.Option(
            None, "--passphrase-file", help="Read the passphrase from this file's first line (implies --encrypt)."
        ),
    ) -> None:
        """Make a new Ed25519 key pair: NAME.key (private, mode 0600; keep it secret) and NAME.pub.

        Give NAME.pub to devices ('edgepack trust init'); sign bundles with NAME.key. With --encrypt, every
        command that signs with NAME.key needs the passphrase ($EDGEPACK_KEY_PASSPHRASE,
        $EDGEPACK_KEY_PASSPHRASE_FILE, or the terminal prompt).
        """
        passphrase = new_passphrase(passphrase_file) if encrypt or passphrase_file else None
        key = SigningKey.generate()
        private_path, public_path = key.save(out, name, passphrase=passphrase)
        note = "encrypted, " if passphrase else ""
        console.print(f"private key  {private_path}  ({note}mode 0600 — keep it secret)")
        console.print(f"public key   {public_path}")
        console.print(f"key id       {key.key_id}")
