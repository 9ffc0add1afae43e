"""Authoring trust roots (the operator's side): create version 1, rotate to N+1, sign with root keys.

This module builds and signs ``tuf.api.metadata`` roots; it decides nothing. Every rule a device applies
to a root — shape, thresholds, the rotation rule, revocations, expiry — is in :mod:`edgepack.trust`, and
:func:`rotate` hands its result to :meth:`TrustStore.update <edgepack.trust.TrustStore.update>`, so the
operator's own store accepts a new version by exactly the rules a device will.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import DelegatedRole, Delegations, Metadata, Role, Root

from edgepack.errors import TrustStoreError
from edgepack.keys import SigningKey, VerifyKey, short_id
from edgepack.manifest import utc_now
from edgepack.trust import (
    ALL_ROLES,
    DEFAULT_ROOT_EXPIRY,
    EXT_REVOKED,
    EXT_ROLES,
    ROLES,
    ROOT_ROLE,
    TRUST_FILE,
    TrustStore,
    check_root_shape,
    key_name,
    revoked_of,
    roles_of,
    tuf_key,
    utc,
)

log = logging.getLogger(__name__)

RoleKeys = Sequence[tuple[VerifyKey, str]]


def signer_for(key: SigningKey) -> CryptoSigner:
    """A securesystemslib signer for one of our keys (TUF signs the root's canonical bytes with it)."""
    return CryptoSigner(key.key, tuf_key(key.public))


def build_root(
    roles: Mapping[str, RoleKeys],
    thresholds: Mapping[str, int],
    *,
    version: int,
    expires: datetime,
    revoked: Sequence[str] = (),
) -> Root:
    """A root whose ``root``, ``bundle`` and ``command`` roles hold ``roles[...]`` with ``thresholds[...]``."""
    missing = [r for r in ALL_ROLES if not roles.get(r) and (version == 1 or r == ROOT_ROLE)]
    if missing:
        raise TrustStoreError(f"every role needs at least one key; none given for {', '.join(missing)}")
    root_keys = {k.key_id: tuf_key(k, name) for k, name in roles[ROOT_ROLE]}
    delegated_keys = {k.key_id: tuf_key(k, name) for r in ROLES for k, name in roles[r]}
    delegations = Delegations(
        keys=delegated_keys,
        roles={
            r: DelegatedRole(r, sorted({k.key_id for k, _ in roles[r]}), thresholds.get(r, 1), True, paths=["*"])
            for r in ROLES
        },
    )
    tuf_roles = {
        ROOT_ROLE: Role(sorted(root_keys), thresholds.get(ROOT_ROLE, 1)),
        **{r: Role([], 1) for r in ("targets", "snapshot", "timestamp")},
    }
    root = Root(
        version=version,
        expires=utc(expires),
        keys=root_keys,
        roles=tuf_roles,
        consistent_snapshot=False,
        unrecognized_fields={EXT_ROLES: delegations.to_dict(), EXT_REVOKED: sorted(set(revoked))},
    )
    check_root_shape(root, source=f"trust root version {version}", strict=version == 1)
    return root


def sign_root(root: Root | Metadata[Root], signers: Sequence[SigningKey]) -> Metadata[Root]:
    md = root if isinstance(root, Metadata) else Metadata(root)
    for key in {k.key_id: k for k in signers}.values():
        md.sign(signer_for(key), append=True)
    return md


def create(
    directory: Path,
    roles: Mapping[str, RoleKeys],
    *,
    thresholds: Mapping[str, int] | None = None,
    expires: datetime | None = None,
    signers: Sequence[SigningKey] = (),
) -> TrustStore:
    """Write version 1 of a trust store (signed by ``signers`` when given; see TrustStore.init)."""
    directory = Path(directory)
    if (directory / TRUST_FILE).exists():
        raise TrustStoreError(f"{directory / TRUST_FILE} already exists; change it with 'edgepack trust rotate'")
    root = build_root(roles, thresholds or {}, version=1, expires=expires or utc_now() + DEFAULT_ROOT_EXPIRY)
    store = TrustStore(directory, sign_root(root, signers))
    store.save()
    return store


def migrate_v01(
    directory: Path,
    root_keys: RoleKeys,
    *,
    root_threshold: int = 1,
    expires: datetime | None = None,
    signers: Sequence[SigningKey] = (),
) -> TrustStore:
    """Turn an edgepack 0.1 trust store (``trust.json`` with ``keys``/``roles``/``revoked``, PEM files in
    ``keys/``) into version 1 of a TUF root with the same bundle and command keys, thresholds and
    revocations, and the given root keys. The old file is kept as ``trust.json.v01``.
    """
    directory = Path(directory)
    path = directory / TRUST_FILE
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        revoked = set(old.get("revoked", []))
        roles: dict[str, list[tuple[VerifyKey, str]]] = {
            r: list(root_keys) if r == ROOT_ROLE else [] for r in ALL_ROLES
        }
        for kid, entry in old["keys"].items():
            key = VerifyKey.load(directory / entry["file"])
            if key.key_id != kid:
                raise TrustStoreError(f"{entry['file']} holds key {short_id(key.key_id)}, not {short_id(kid)}")
            for role in entry["roles"]:
                if role in ROLES and kid not in revoked:
                    roles[role].append((key, str(entry.get("name", ""))))
        thresholds = {r: int(v["threshold"]) for r, v in old["roles"].items() if r in ROLES}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrustStoreError(f"{path} is not an edgepack 0.1 trust store: {exc!r}") from exc
    thresholds[ROOT_ROLE] = root_threshold
    root = build_root(roles, thresholds, version=1, expires=expires or utc_now() + DEFAULT_ROOT_EXPIRY,
                      revoked=sorted(revoked))  # fmt: skip
    shutil.copy2(path, directory / f"{TRUST_FILE}.v01")
    store = TrustStore(directory, sign_root(root, signers))
    store.save()
    return store


def current_roles(store: TrustStore) -> dict[str, list[tuple[VerifyKey, str]]]:
    """The keys (with names) each role of ``store`` holds now."""
    out: dict[str, list[tuple[VerifyKey, str]]] = {r: [] for r in ALL_ROLES}
    for trusted in store.keys.values():
        for role in trusted.roles:
            out[role].append((trusted.key, trusted.name))
    return out


def rotate(
    store: TrustStore,
    signers: Sequence[SigningKey],
    *,
    add: Mapping[str, RoleKeys] | None = None,
    remove: Sequence[str] = (),
    revoke: Sequence[str] = (),
    thresholds: Mapping[str, int] | None = None,
    expires: datetime | None = None,
    apply: bool = True,
) -> Metadata[Root]:
    """Make version N+1 of ``store``'s root, sign it with ``signers`` and apply it to ``store``.

    ``apply=False``: only make and sign it (a k-of-n ceremony: the other holders add their signatures with
    :func:`resign`, then :meth:`TrustStore.update` applies it).

    ``add``: keys to give roles; ``remove``: key ids (or 8+ character prefixes) to take out of every role;
    ``revoke``: key ids to take out *and* list as revoked forever (a stolen key). ``signers`` must include a
    threshold of version N's root keys and of version N+1's; :meth:`TrustStore.update` checks it.
    """
    roles = current_roles(store)
    for role, keys in (add or {}).items():
        if role not in ALL_ROLES:
            raise TrustStoreError(f"unknown role {role!r}; roles are {', '.join(ALL_ROLES)}")
        have = {k.key_id for k, _ in roles[role]}
        roles[role] += [(k, n) for k, n in keys if k.key_id not in have]
    gone = {store.resolve(k) for k in [*remove, *revoke]}
    for role in roles:
        roles[role] = [(k, n) for k, n in roles[role] if k.key_id not in gone]
    revoked = revoked_of(store.root.signed) | {store.resolve(k) for k in revoke}
    for kid in revoked:
        for role in roles:
            if any(k.key_id == kid for k, _ in roles[role]):
                raise TrustStoreError(f"key {short_id(kid)} is revoked and cannot hold role {role!r} again")
    new_thresholds = {**store.thresholds, **(thresholds or {})}
    for role, keys in roles.items():  # never lowered silently: a role short of keys signs nothing
        if len(keys) < new_thresholds[role] and role != ROOT_ROLE:
            log.warning("role %s holds %d key(s), fewer than its threshold %d: it can sign nothing until "
                        "keys are added or the threshold lowered", role, len(keys), new_thresholds[role])  # fmt: skip
    root = build_root(
        roles,
        new_thresholds,
        version=store.version + 1,
        expires=expires or utc_now() + DEFAULT_ROOT_EXPIRY,
        revoked=sorted(revoked),
    )
    md = sign_root(root, signers)
    if apply:
        store.update([md.to_dict()])
    return md


def resign(md: Metadata[Root], signers: Sequence[SigningKey]) -> Metadata[Root]:
    """Add signatures to an existing root (a k-of-n root signed by its holders one after the other)."""
    return sign_root(Metadata.from_dict(copy.deepcopy(md.to_dict())), signers)


def describe_role_keys(store: TrustStore) -> list[tuple[str, str, str, str]]:
    """(key id, name, roles, state) rows for display."""
    rows = [(kid, t.name, ", ".join(t.roles), "trusted") for kid, t in sorted(store.keys.items())]
    rows += [(kid, "", "", "revoked") for kid in sorted(store.revoked)]
    return rows


__all__ = [
    "build_root",
    "create",
    "current_roles",
    "describe_role_keys",
    "key_name",
    "migrate_v01",
    "resign",
    "roles_of",
    "rotate",
    "sign_root",
    "signer_for",
]
