"""Every trust rule of edgepack, in one place: who may sign what, and what a device accepts.

A trust store is a directory::

    trust.json        {"version": 1, "keys": {KEYID: {"file", "name", "roles"}},
                       "roles": {ROLE: {"threshold": K}}, "revoked": [KEYID, ...]}
    keys/KEYID.pub    the public keys, PEM

Roles: ``bundle`` (signs bundles) and ``command`` (signs commands that change what a device runs).

Invariants this module keeps (nothing else in edgepack decides trust):

1. A message is trusted for a role only when at least ``threshold`` *distinct* keys that hold the role,
   are listed in ``trust.json`` and are not revoked have valid Ed25519 signatures over it.
2. A signature by a trusted key that does not verify rejects the message outright, even when the
   threshold is met by others: it can only mean the manifest or the signature was altered.
3. Signatures by unknown or revoked keys never count; when the threshold is not met because of them, the
   error names them (``UnknownKeyError`` / ``RevokedKeyError``).
4. Signatures cover domain-separated bytes (``edgepack/<kind>/v1\\0`` + canonical JSON), so a signature
   over one kind of document can never be replayed as another.
5. A bundle whose ``expires_at`` has passed is refused (freeze attacks); a bundle whose version is lower
   than the highest version seen for its model name is refused (anti-rollback), except for an explicit
   rollback to the kept previous bundle, which the caller states with ``allow_older=True``.
6. A bundle built for another target than the device's is refused.
7. A revoked key id stays revoked: ``revoke`` only adds, and ``add_key`` refuses a revoked id.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import semver

from edgepack.errors import (
    ExpiredBundleError,
    RevokedKeyError,
    RollbackRefusedError,
    SignatureInvalidError,
    TargetMismatchError,
    ThresholdNotMetError,
    TrustStoreError,
    UnknownKeyError,
)
from edgepack.fsutil import atomic_write_bytes, atomic_write_json
from edgepack.keys import SigningKey, VerifyKey, short_id
from edgepack.manifest import Manifest, canonical_json, utc_now

log = logging.getLogger(__name__)

TRUST_FILE = "trust.json"
ROLES = ("bundle", "command")
DOMAINS = {"manifest": b"edgepack/manifest/v1\x00", "command": b"edgepack/command/v1\x00"}
MAX_SIGNATURES = 16


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes

    def to_json(self) -> dict[str, str]:
        return {"keyid": self.keyid, "sig": base64.b64encode(self.sig).decode()}

    @classmethod
    def from_json(cls, obj: object) -> Signature:
        if not isinstance(obj, dict) or set(obj) != {"keyid", "sig"}:
            raise SignatureInvalidError("a signature entry must be an object with exactly 'keyid' and 'sig'")
        keyid, sig = obj["keyid"], obj["sig"]
        if not isinstance(keyid, str) or not isinstance(sig, str):
            raise SignatureInvalidError("signature 'keyid' and 'sig' must be strings")
        try:
            raw = base64.b64decode(sig, validate=True)
        except binascii.Error as exc:
            raise SignatureInvalidError(f"signature by key {short_id(keyid)} is not valid base64") from exc
        return cls(keyid, raw)


def signed_message(kind: str, document: bytes) -> bytes:
    """The bytes a signature of ``kind`` ("manifest" or "command") covers."""
    return DOMAINS[kind] + document


def sign(kind: str, document: bytes, key: SigningKey) -> Signature:
    return Signature(key.key_id, key.sign(signed_message(kind, document)))


def encode_signatures(signatures: Iterable[Signature]) -> bytes:
    """Canonical ``signatures.json``: one entry per key id, sorted by key id."""
    unique = {s.keyid: s for s in signatures}
    return canonical_json({"signatures": [unique[k].to_json() for k in sorted(unique)]})


def decode_signatures(data: bytes) -> list[Signature]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SignatureInvalidError(f"signatures.json is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict) or set(obj) != {"signatures"} or not isinstance(obj["signatures"], list):
        raise SignatureInvalidError('signatures.json must be {"signatures": [...]}')
    if len(obj["signatures"]) > MAX_SIGNATURES:
        raise SignatureInvalidError(f"more than {MAX_SIGNATURES} signatures")
    signatures = [Signature.from_json(entry) for entry in obj["signatures"]]
    if encode_signatures(signatures) != data:
        raise SignatureInvalidError("signatures.json is not canonical (sorted, unique key ids, compact)")
    return signatures


@dataclass
class TrustedKey:
    key: VerifyKey
    name: str
    roles: list[str]


@dataclass
class TrustStore:
    """The keys a device trusts, their roles and thresholds, and the revoked key ids."""

    directory: Path
    keys: dict[str, TrustedKey] = field(default_factory=dict)
    thresholds: dict[str, int] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)

    # --- files -----------------------------------------------------------------------------------

    @classmethod
    def init(
        cls, directory: Path, public_keys: Sequence[Path], *, threshold: int = 1, roles: Sequence[str] = ROLES
    ) -> TrustStore:
        """Create a trust store trusting ``public_keys`` for ``roles`` with a k-of-n ``threshold``."""
        directory = Path(directory)
        if (directory / TRUST_FILE).exists():
            raise TrustStoreError(f"{directory / TRUST_FILE} already exists; edit it with 'edgepack trust'")
        if not public_keys:
            raise TrustStoreError("a trust store needs at least one public key (--key PUB)")
        store = cls(directory, thresholds={role: threshold for role in roles})
        for path in public_keys:
            store._add(VerifyKey.load(Path(path)), Path(path).stem, list(roles))
        store._check_thresholds()
        store.save()
        return store

    @classmethod
    def load(cls, directory: Path) -> TrustStore:
        directory = Path(directory)
        path = directory / TRUST_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise TrustStoreError(
                f"no trust store at {directory} ({TRUST_FILE} missing); create one with "
                "'edgepack trust init DIR --key PUB'"
            ) from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise TrustStoreError(f"cannot read {path}: {exc}") from exc
        try:
            store = cls(
                directory,
                thresholds={r: int(v["threshold"]) for r, v in raw["roles"].items()},
                revoked=set(raw.get("revoked", [])),
            )
            for kid, entry in raw["keys"].items():
                key = VerifyKey.load(directory / entry["file"])
                if key.key_id != kid:
                    raise TrustStoreError(f"{entry['file']} holds key {short_id(key.key_id)}, not {short_id(kid)}")
                store.keys[kid] = TrustedKey(key, entry.get("name", ""), list(entry["roles"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TrustStoreError(f"{path} is malformed: {exc!r}") from exc
        store._check_thresholds()
        return store

    def save(self) -> None:
        keys_dir = self.directory / "keys"
        keys_dir.mkdir(parents=True, exist_ok=True)
        entries = {}
        for kid, trusted in sorted(self.keys.items()):
            rel = f"keys/{kid}.pub"
            atomic_write_bytes(self.directory / rel, trusted.key.to_pem())
            entries[kid] = {"file": rel, "name": trusted.name, "roles": trusted.roles}
        atomic_write_json(
            self.directory / TRUST_FILE,
            {
                "version": 1,
                "keys": entries,
                "roles": {r: {"threshold": k} for r, k in sorted(self.thresholds.items())},
                "revoked": sorted(self.revoked),
            },
        )

    # --- changes ---------------------------------------------------------------------------------

    def add_key(self, key: VerifyKey, name: str, roles: Sequence[str] = ROLES) -> str:
        self._add(key, name, list(roles))
        self.save()
        return key.key_id

    def revoke(self, kid_or_prefix: str) -> str:
        """Revoke a key by id or unique id prefix (at least 8 hex characters); returns the full id."""
        kid = self.resolve(kid_or_prefix)
        self.revoked.add(kid)
        for role, k in self.thresholds.items():
            if len(self._holders(role)) < k:
                log.warning("role %s now has fewer usable keys than its threshold %d", role, k)
        self.save()
        return kid

    def resolve(self, kid_or_prefix: str) -> str:
        if len(kid_or_prefix) < 8:
            raise TrustStoreError("give at least 8 characters of the key id")
        matches = [k for k in self.keys if k.startswith(kid_or_prefix.lower())]
        if len(matches) != 1:
            known = ", ".join(short_id(k) for k in self.keys)
            raise TrustStoreError(f"key id {kid_or_prefix!r} matches {len(matches)} keys (known: {known})")
        return matches[0]

    # --- rules -----------------------------------------------------------------------------------

    def verify(self, kind: str, document: bytes, signatures: Sequence[Signature], role: str) -> list[str]:
        """Check ``signatures`` over ``document`` for ``role``; return the key ids that counted.

        Raises the most specific VerificationError when the document is not trusted (invariants 1-4).
        """
        message = signed_message(kind, document)
        threshold = self.thresholds.get(role)
        if threshold is None:
            raise TrustStoreError(f"trust store has no role {role!r}")
        counted: list[str] = []
        unknown: list[str] = []
        revoked: list[str] = []
        for sig in {s.keyid: s for s in signatures}.values():
            trusted = self.keys.get(sig.keyid)
            if trusted is None:
                unknown.append(sig.keyid)
                continue
            if not trusted.key.verifies(sig.sig, message):
                raise SignatureInvalidError(
                    f"signature by key {short_id(sig.keyid)} ({trusted.name}) does not match the {kind}: "
                    f"the {kind} or its signature was altered"
                )
            if sig.keyid in self.revoked:
                revoked.append(sig.keyid)
            elif role in trusted.roles:
                counted.append(sig.keyid)
        if len(counted) >= threshold:
            for kid in revoked:
                log.warning("ignored a signature by revoked key %s", short_id(kid))
            return counted
        if revoked:
            raise RevokedKeyError(
                f"signed by revoked key {', '.join(short_id(k) for k in revoked)}; "
                f"{len(counted)} of {threshold} required signatures remain — re-sign with a trusted key"
            )
        if unknown and not counted:
            raise UnknownKeyError(
                f"signed by unknown key {', '.join(short_id(k) for k in unknown)}; this trust store "
                f"trusts {', '.join(short_id(k) for k in self._holders(role)) or 'no key'} for {role!r}"
            )
        raise ThresholdNotMetError(
            f"{len(counted)} of {threshold} required signatures for role {role!r}; "
            "add signatures with 'edgepack sign BUNDLE --key KEY'"
        )

    # --- internals -------------------------------------------------------------------------------

    def _add(self, key: VerifyKey, name: str, roles: list[str]) -> None:
        unknown_roles = set(roles) - set(ROLES)
        if unknown_roles:
            raise TrustStoreError(f"unknown role(s) {sorted(unknown_roles)}; roles are {', '.join(ROLES)}")
        if key.key_id in self.revoked:
            raise TrustStoreError(f"key {short_id(key.key_id)} is revoked and cannot be trusted again")
        self.keys[key.key_id] = TrustedKey(key, name, roles)

    def _holders(self, role: str) -> list[str]:
        return [k for k, t in self.keys.items() if role in t.roles and k not in self.revoked]

    def _check_thresholds(self) -> None:
        for role, k in self.thresholds.items():
            if role not in ROLES:
                raise TrustStoreError(f"unknown role {role!r} in {TRUST_FILE}")
            holders = [kid for kid, t in self.keys.items() if role in t.roles]
            if not 1 <= k <= len(holders):
                raise TrustStoreError(
                    f"threshold {k} for role {role!r} must be between 1 and the {len(holders)} key(s) holding it"
                )


def check_not_expired(manifest: Manifest, now: datetime | None = None) -> None:
    """Invariant 5 (freeze): refuse a bundle past its expiry."""
    now = now or utc_now()
    if manifest.expires_at is not None and manifest.expires_at <= now:
        raise ExpiredBundleError(
            f"bundle {manifest.name} {manifest.version} expired at {manifest.expires_at.isoformat()}; "
            "ask for a freshly signed bundle"
        )


def check_version_forward(manifest: Manifest, highest_seen: str | None, *, allow_older: bool = False) -> None:
    """Invariant 5 (anti-rollback): versions only go forward per model name."""
    if highest_seen is None or allow_older:
        return
    if semver.Version.parse(manifest.version) < semver.Version.parse(highest_seen):
        raise RollbackRefusedError(
            f"{manifest.name} {manifest.version} is older than {highest_seen}, already seen on this device; "
            "versions only go forward (use an explicit rollback to return to the kept previous bundle)"
        )


def check_target(manifest: Manifest, device_targets: Iterable[str] | None) -> None:
    """Invariant 6: a bundle runs only on a device of its target."""
    if device_targets is None:
        return
    accepted = set(device_targets)
    if manifest.target not in accepted:
        raise TargetMismatchError(
            f"bundle {manifest.name} {manifest.version} is built for target {manifest.target!r}; "
            f"this device accepts {', '.join(sorted(accepted))}"
        )
