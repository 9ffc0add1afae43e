"""``edgepack trust``: create a device trust root, rotate it (new keys, revocations, fresh expiry), show it.

Rules live in :mod:`edgepack.trust`, authoring in :mod:`edgepack.trust_root`; this module parses options.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer
from rich.table import Table

from edgepack.cli.console import console
from edgepack.errors import TrustStoreError
from edgepack.fsutil import atomic_write_bytes
from edgepack.keys import SigningKey, VerifyKey
from edgepack.trust import (
    ALL_ROLES,
    DEFAULT_ROOT_EXPIRY,
    HISTORY_DIR,
    ROOT_ROLE,
    TrustStore,
    parse_expires,
    parse_root,
)
from edgepack.trust_root import create, describe_role_keys, migrate_v01, resign, rotate

EXPIRES_HELP = "When the root expires: a duration (365d, 26w), an ISO 8601 time (default 365d)."


def _load_any(path: Path) -> tuple[VerifyKey, SigningKey | None]:
    """A public key from a .pub file, or the public half and the private key from a .key file."""
    if path.suffix == ".key":
        private = SigningKey.load(path)
        return private.public, private
    return VerifyKey.load(path), None


def _thresholds(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        if value.isdigit():  # a bare K: every role
            out.update(dict.fromkeys(ALL_ROLES, int(value)))
            continue
        role, sep, number = value.partition("=")
        if not sep or role not in ALL_ROLES or not number.isdigit():
            raise TrustStoreError(f"--threshold {value!r} must be ROLE=K with ROLE one of {', '.join(ALL_ROLES)}")
        out[role] = int(number)
    return out


def _root_expiry(text: str | None) -> datetime:
    expires = parse_expires(text, DEFAULT_ROOT_EXPIRY)
    if expires is None:
        raise TrustStoreError("a trust root always expires (freeze attacks); give a duration or a time")
    return expires


def register(app: typer.Typer) -> None:
    trust = typer.Typer(
        help="Create, rotate and show the trust root a device verifies bundles and commands with.",
        no_args_is_help=True,
    )
    app.add_typer(trust, name="trust")

    @trust.command("init")
    def init(
        directory: Path = typer.Argument(..., help="Trust store directory to create."),
        root: list[Path] = typer.Option([], "--root", help="A root key (.pub, or .key to sign version 1); repeat."),
        bundle: list[Path] = typer.Option([], "--bundle", help="A public key that signs bundles; repeat for several."),
        command: list[Path] = typer.Option([], "--command", help="A public key that signs commands; repeat."),
        key: list[Path] = typer.Option([], "--key", help="Shortcut for one-key setups: this key holds every role."),
        threshold: list[str] = typer.Option(
            [], "--threshold", help="ROLE=K: K of the role's keys must sign (k of n); a bare K for every role."
        ),
        expires: str | None = typer.Option(None, "--expires", help=EXPIRES_HELP),
    ) -> None:
        """Create version 1 of a trust root: root (offline, k-of-n), bundle and command keys, each with a threshold.

        Keys given with --root as .key files sign version 1; keep them offline afterwards.
        """
        loaded = {role: [(*_load_any(p), p.stem) for p in paths]
                  for role, paths in ((ROOT_ROLE, root), ("bundle", bundle), ("command", command))}  # fmt: skip
        for role in loaded:
            loaded[role] += [(*_load_any(p), p.stem) for p in key]
        roles = {role: [(pub, name) for pub, _, name in entries] for role, entries in loaded.items()}
        signers = [private for _, private, _ in loaded[ROOT_ROLE] if private is not None]
        store = create(directory, roles, thresholds=_thresholds(threshold), expires=_root_expiry(expires),
                       signers=signers)  # fmt: skip
        _show(store)
        if not signers:
            console.print("version 1 is unsigned: a device trusts it because it ships with it (TUF §5.2)")

    @trust.command("rotate")
    def rotate_cmd(
        directory: Path = typer.Argument(..., help="Trust store directory (the operator's copy)."),
        root_key: list[Path] = typer.Option(
            ..., "--root-key", help="A root private key that signs version N+1: enough old AND new ones; repeat."
        ),
        add: list[str] = typer.Option([], "--add", help="ROLE=PUB: give a key a role (root, bundle, command)."),
        remove: list[str] = typer.Option([], "--remove", help="Key id (8+ chars) to take out of every role."),
        revoke: list[str] = typer.Option([], "--revoke", help="Key id (8+ chars) to take out and revoke for good."),
        threshold: list[str] = typer.Option([], "--threshold", help="ROLE=K: a new threshold for a role."),
        expires: str | None = typer.Option(None, "--expires", help=EXPIRES_HELP),
        out: Path | None = typer.Option(
            None,
            "--out",
            help="Only write the signed N+1 here (others add signatures: 'trust sign'; then 'trust apply').",
        ),
    ) -> None:
        """Write and sign version N+1 of the trust root (TUF §5.3.4), then push it with 'edgepack fleet trust push'.

        Revoking a stolen release key: --revoke KEYID. Devices refuse its bundles and commands as soon as
        they apply N+1, with no re-flash.
        """
        signers = [SigningKey.load(p) for p in root_key]
        additions: dict[str, list[tuple[VerifyKey, str]]] = {}
        for value in add:
            role, sep, path = value.partition("=")
            if not sep or role not in ALL_ROLES:
                raise TrustStoreError(f"--add {value!r} must be ROLE=PUB with ROLE one of {', '.join(ALL_ROLES)}")
            additions.setdefault(role, []).append((_load_any(Path(path))[0], Path(path).stem))
        store = TrustStore.load(directory)
        md = rotate(store, signers, add=additions, remove=remove, revoke=revoke,
                    thresholds=_thresholds(threshold), expires=_root_expiry(expires), apply=out is None)  # fmt: skip
        if out is not None:
            atomic_write_bytes(out, md.to_bytes())
            console.print(f"wrote trust root version {md.signed.version} to {out} with {len(md.signatures)} signature(s); "
                          "add more with 'edgepack trust sign', then 'edgepack trust apply'")  # fmt: skip
            return
        console.print(
            f"wrote trust root version {md.signed.version}: {directory / HISTORY_DIR}/{md.signed.version}.root.json"
        )
        _show(store)

    @trust.command("revoke")
    def revoke_cmd(
        directory: Path = typer.Argument(..., help="Trust store directory (the operator's copy)."),
        keyid: str = typer.Argument(..., help="Key id to revoke (or its first 8+ characters)."),
        root_key: list[Path] = typer.Option(..., "--root-key", help="Root private key(s) that sign version N+1."),
    ) -> None:
        """Revoke a key (shortcut for 'trust rotate --revoke KEYID'): its bundles and commands are refused."""
        store = TrustStore.load(directory)
        full = store.resolve(keyid)
        rotate(store, [SigningKey.load(p) for p in root_key], revoke=[full])
        console.print(f"revoked {full} in trust root version {store.version}")
        _show(store)

    @trust.command("sign")
    def sign_cmd(
        file: Path = typer.Argument(..., help="A root version written by 'trust rotate --out'."),
        root_key: list[Path] = typer.Option(..., "--root-key", help="A root private key to add a signature with."),
    ) -> None:
        """Add root-key signatures to a root version (each holder of a k-of-n root signs in turn, offline)."""
        md = resign(parse_root(file.read_bytes(), source=str(file)), [SigningKey.load(p) for p in root_key])
        atomic_write_bytes(file, md.to_bytes())
        console.print(f"{file}: trust root version {md.signed.version}, {len(md.signatures)} signature(s)")

    @trust.command("apply")
    def apply_cmd(
        directory: Path = typer.Argument(..., help="Trust store directory (the operator's copy)."),
        file: Path = typer.Argument(..., help="The signed root version N+1."),
    ) -> None:
        """Make a signed root version current in the operator's store, by the rules a device applies."""
        store = TrustStore.load(directory)
        applied = store.update([file.read_bytes()])
        console.print(f"trust root now version {store.version}" if applied else "nothing newer to apply")
        _show(store)

    @trust.command("migrate")
    def migrate_cmd(
        directory: Path = typer.Argument(..., help="An edgepack 0.1 trust store, converted in place."),
        root: list[Path] = typer.Option(..., "--root", help="A root key (.pub, or .key to sign version 1); repeat."),
        threshold: int = typer.Option(1, "--root-threshold", help="How many root keys must sign a new version."),
        expires: str | None = typer.Option(None, "--expires", help=EXPIRES_HELP),
    ) -> None:
        """Convert a 0.1 trust store (keys and roles in trust.json) into version 1 of a TUF root, same keys."""
        loaded = [(*_load_any(p), p.stem) for p in root]
        store = migrate_v01(directory, [(pub, name) for pub, _, name in loaded], root_threshold=threshold,
                            expires=_root_expiry(expires), signers=[k for _, k, _ in loaded if k is not None])  # fmt: skip
        console.print(f"converted {directory}; the 0.1 file is kept as trust.json.v01")
        _show(store)

    @trust.command("show")
    def show(directory: Path = typer.Argument(..., help="Trust store directory.")) -> None:
        """List the root's version and expiry, the keys, their roles, thresholds and revocations."""
        _show(TrustStore.load(directory))


def _show(store: TrustStore) -> None:
    info = store.describe()
    state = "[red]EXPIRED[/]" if info["expired"] else "valid"
    console.print(f"trust root version {info['version']}, expires {info['expires']} ({state})")
    table = Table(title=f"trust store {store.directory}")
    for column in ("key id", "name", "roles", "state"):
        table.add_column(column)
    for kid, name, roles, key_state in describe_role_keys(store):
        table.add_row(kid, name, roles, "[red]revoked[/]" if key_state == "revoked" else key_state)
    console.print(table)
    console.print("thresholds: " + ", ".join(f"{r} {k}-of-n" for r, k in sorted(store.thresholds.items())))
