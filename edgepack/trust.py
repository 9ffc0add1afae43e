"""Every trust rule of edgepack, in one place: who may sign what, and what a device accepts.

**Where python-tuf ends and our code begins.** The device's trust root is a TUF root: a
``tuf.api.metadata.Metadata[Root]`` document, versioned, expiring, signed by a k-of-n threshold of the
offline ``root`` keys. python-tuf gives us the metadata schema and its canonical signed bytes, the keys
(``securesystemslib`` Ed25519), thresholds and their verification (``get_verification_result``), expiry
(``is_expired``) and the rule of root rotation (TUF §5.3.4: N+1 must be signed by a threshold of N's root
keys and of its own). TUF's repository model — targets, snapshot and timestamp metadata that a client
downloads from a server — does not fit a device that receives two kinds of signed things pushed over
MQTT, so edgepack keeps its own code for what TUF does not cover:

- the two roles a device acts on, ``bundle`` (signs bundle manifests) and ``command`` (signs commands),
  held as a TUF ``Delegations`` object inside the root (field ``x-edgepack-roles``) so they are covered by
  the root's signatures, version and expiry, and verified with TUF's own ``Targets`` delegation code;
- the signed bytes of bundles and commands (domain-separated, below), anti-rollback per model name, the
  target check and bundle expiry — a bundle is per model, not a TUF target file;
- the revocation list (``x-edgepack-revoked``, also inside the signed root), which only ever grows.

Command *ordering* (the operator-side counter) and *replay* (ids run once, ``seq`` only grows per model)
are kept by the device's command book (``agent/link/book.py``), which needs per-device state; whether a
command is *trusted* is decided here (:meth:`TrustStore.verify`, role ``command``).

TUF's top-level ``targets``, ``snapshot`` and ``timestamp`` roles must be present in a root; edgepack
lists them with no keys, so nothing can ever sign as them.

A trust store is a directory::

    trust.json          the current root, TUF JSON ({"signed": {...}, "signatures": [...]})
    roots/N.root.json   every version this store has held (the operator sends devices the chain)

Invariants this module keeps (nothing else in edgepack decides trust):

1. A message is trusted for a role only when at least ``threshold`` *distinct* keys of that role in the
   current root, not revoked, have valid Ed25519 signatures over it.
2. A signature by a known key that does not verify rejects the message outright, even when the threshold
   is met by others: it can only mean the document or the signature was altered.
3. Signatures by unknown or revoked keys never count; when the threshold is not met because of them, the
   error names them (``UnknownKeyError`` / ``RevokedKeyError``).
4. Signatures cover domain-separated bytes (``edgepack/<kind>/v1\\0`` + canonical JSON), so a signature
   over one kind of document can never be replayed as another.
5. A bundle whose ``expires_at`` has passed is refused (freeze attacks); a bundle whose version is lower
   than the highest version seen for its model name is refused (anti-rollback), except for an explicit
   rollback to the kept previous bundle, which the caller states with ``allow_older=True``.
6. A bundle built for another target than the device's is refused.
7. A revoked key id stays revoked: a new root must revoke at least what the old one did, and no role may
   hold a revoked key.
8. Root version N+1 replaces N only when signed by a threshold of N's root keys **and** of its own, and
   only as exactly N+1 (a chain of versions is walked in order). The newest root of an update must not
   be expired; intermediate ones may be (TUF §5.3.4-5.3.10).
9. An expired root serves what is installed (``verify(..., installed=True)``) but accepts nothing new:
   no bundle install and no command until a fresh root arrives (which it still accepts, by rule 8).
10. Every key id is the sha256 of the raw Ed25519 public key, so two key ids can never name one key and
    count twice towards a threshold.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import semver
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from securesystemslib.signer import SSlibKey
from tuf.api.metadata import Delegations, Key, Metadata, Root, Targets
from tuf.api.metadata import Signature as TufSignature

from edgepack.errors import (
    ExpiredBundleError,
    ExpiredTrustError,
    RevokedKeyError,
    RollbackRefusedError,
    SignatureInvalidError,
    TargetMismatchError,
    ThresholdNotMetError,
    TrustStoreError,
    TrustUpdateError,
    UnknownKeyError,
)
from edgepack.fsutil import atomic_write_bytes
from edgepack.keys import VerifyKey, key_id, short_id
from edgepack.manifest import Manifest, canonical_json, utc_now

log = logging.getLogger(__name__)

TRUST_FILE = "trust.json"
HISTORY_DIR = "roots"
ROOT_ROLE = "root"
ROLES = ("bundle", "command")  # the roles that sign what a device runs
ALL_ROLES = (ROOT_ROLE, *ROLES)
EXT_ROLES = "x-edgepack-roles"
EXT_REVOKED = "x-edgepack-revoked"
EXT_NAME = "x-edgepack-name"
DOMAINS = {"manifest": b"edgepack/manifest/v1\x00", "command": b"edgepack/command/v1\x00"}
MAX_SIGNATURES = 16
MAX_ROOT_BYTES = 256 << 10
DEFAULT_ROOT_EXPIRY = timedelta(days=365)  # root keys are offline: a yearly re-signing ceremony
DEFAULT_BUNDLE_EXPIRY = timedelta(days=90)  # docs/security.md defends the figure
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_KEYID = re.compile(r"^[0-9a-f]{64}$")


# --- signatures over bundles and commands --------------------------------------------------------


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


def sign(kind: str, document: bytes, key: Any) -> Signature:
    """Sign ``document`` as ``kind`` with a :class:`~edgepack.keys.SigningKey`."""
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


# --- TUF keys and roots --------------------------------------------------------------------------


def tuf_key(key: VerifyKey, name: str = "") -> Key:
    """Our Ed25519 public key as a TUF key whose id is our key id (sha256 of the raw key)."""
    tkey = SSlibKey.from_crypto(key.key, keyid=key.key_id)
    if name:
        tkey.unrecognized_fields[EXT_NAME] = name
    return tkey


def key_name(key: Key) -> str:
    return str(key.unrecognized_fields.get(EXT_NAME, ""))


def parse_root(data: bytes | dict[str, Any], *, source: str = "trust root") -> Metadata[Root]:
    """Parse a TUF root document (bytes or its JSON object) and check edgepack's rules of shape."""
    try:
        if isinstance(data, dict):
            md = Metadata.from_dict(copy.deepcopy(data))
        else:
            if len(data) > MAX_ROOT_BYTES:
                raise TrustStoreError(f"{source} is {len(data)} bytes, more than the {MAX_ROOT_BYTES} allowed")
            md = Metadata.from_bytes(data)
    except TrustStoreError:
        raise
    except Exception as exc:  # python-tuf raises ValueError, KeyError, TypeError or DeserializationError
        raise TrustStoreError(f"{source} is not TUF root metadata: {exc}") from exc
    if not isinstance(md.signed, Root):
        raise TrustStoreError(f"{source} is TUF {md.signed.type!r} metadata, not a root")
    check_root_shape(md.signed, source=source)
    return md  # type: ignore[return-value]


def roles_of(root: Root) -> Delegations:
    """The ``bundle`` and ``command`` roles a root delegates (its ``x-edgepack-roles`` field)."""
    raw = root.unrecognized_fields.get(EXT_ROLES)
    if not isinstance(raw, dict):
        raise TrustStoreError(f"trust root has no {EXT_ROLES!r} (the bundle and command roles)")
    try:
        return Delegations.from_dict(copy.deepcopy(raw))
    except Exception as exc:
        raise TrustStoreError(f"trust root's {EXT_ROLES!r} is malformed: {exc}") from exc


def revoked_of(root: Root) -> set[str]:
    raw = root.unrecognized_fields.get(EXT_REVOKED, [])
    if not isinstance(raw, list) or not all(isinstance(k, str) and _KEYID.match(k) for k in raw):
        raise TrustStoreError(f"trust root's {EXT_REVOKED!r} must be a list of key ids")
    return set(raw)


def check_root_shape(root: Root, *, source: str = "trust root", strict: bool = False) -> None:
    """Rules 7 and 10 and sane thresholds: no revoked key holds a role, the root role can always sign.

    ``strict`` (a new store): every role's threshold can be met by its keys.
    """
    delegations = roles_of(root)
    revoked = revoked_of(root)
    names = set((delegations.roles or {}).keys())
    if names != set(ROLES):
        raise TrustStoreError(f"{source} must delegate exactly the roles {', '.join(ROLES)}; it has {sorted(names)}")
    role_keys: list[tuple[str, list[str], int, dict[str, Key]]] = [
        (ROOT_ROLE, root.roles[ROOT_ROLE].keyids, root.roles[ROOT_ROLE].threshold, root.keys)
    ]
    role_keys += [(n, r.keyids, r.threshold, delegations.keys) for n, r in (delegations.roles or {}).items()]
    for name, keyids, threshold, keys in role_keys:
        # a bundle or command role may hold fewer keys than its threshold after a revocation: it then
        # signs nothing until keys are added; the root role must always be able to sign its successor
        most = len(keyids) if name == ROOT_ROLE or strict else max(len(keyids), threshold)
        if not 1 <= threshold <= most:
            raise TrustStoreError(
                f"{source}: threshold {threshold} for role {name!r} must be between 1 and its {len(keyids)} key(s)"
            )
        for kid in keyids:
            key = keys.get(kid)
            if key is None:
                raise TrustStoreError(f"{source}: role {name!r} names key {short_id(kid)} but does not list it")
            _check_key(kid, key, source)
            if kid in revoked:
                raise TrustStoreError(f"{source}: role {name!r} holds revoked key {short_id(kid)}")
    for role in ("targets", "snapshot", "timestamp"):
        if root.roles[role].keyids:
            raise TrustStoreError(f"{source}: TUF role {role!r} is unused by edgepack and must hold no key")


def _check_key(kid: str, key: Key, source: str) -> None:
    if key.keytype != "ed25519" or key.scheme != "ed25519":
        raise TrustStoreError(f"{source}: key {short_id(kid)} is {key.keytype}/{key.scheme}; edgepack uses ed25519")
    try:
        raw = bytes.fromhex(str(key.keyval["public"]))
        Ed25519PublicKey.from_public_bytes(raw)
    except (KeyError, ValueError) as exc:
        raise TrustStoreError(f"{source}: key {short_id(kid)} is not a valid Ed25519 public key") from exc
    if key_id(raw) != kid:
        raise TrustStoreError(f"{source}: key id {short_id(kid)} is not the sha256 of its public key")


def root_signatures_result(delegator: Root, md: Metadata[Root]) -> tuple[int, int, list[str]]:
    """How many of ``delegator``'s root keys signed ``md``: (valid signatures, threshold, names of signers)."""
    result = delegator.get_verification_result(ROOT_ROLE, md.signed_bytes, md.signatures)
    return len(result.signed), result.threshold, [key_name(k) or short_id(kid) for kid, k in result.signed.items()]


def check_rotation(old: Metadata[Root], new: Metadata[Root]) -> None:
    """Rule 8 and 7 for one step: may ``new`` replace ``old``? Raises TrustUpdateError naming why not."""
    have, want = old.signed.version, new.signed.version
    if want != have + 1:
        what = "an old or replayed" if want <= have else f"a skipped-ahead (missing {have + 1}..{want - 1})"
        raise TrustUpdateError(
            f"trust root version {want} is {what} version: this device holds {have} and accepts only {have + 1} "
            "next (send the whole chain: 'edgepack fleet trust push' does)"
        )
    for signer, label in ((old.signed, f"version {have}"), (new.signed, f"version {want} itself")):
        count, threshold, _ = root_signatures_result(signer, new)
        if count < threshold:
            raise TrustUpdateError(
                f"trust root version {want} has {count} of the {threshold} valid signatures by the root keys of "
                f"{label}; sign it with 'edgepack trust rotate --root-key KEY' using enough of those keys"
            )
    lost = revoked_of(old.signed) - revoked_of(new.signed)
    if lost:
        raise TrustUpdateError(
            f"trust root version {want} un-revokes {', '.join(short_id(k) for k in sorted(lost))}; a revoked key "
            "stays revoked"
        )


def _expiry_text(root: Root) -> str:
    return root.expires.isoformat().replace("+00:00", "Z")


# --- the device's trust store --------------------------------------------------------------------


@dataclass
class TrustedKey:
    key: VerifyKey
    name: str
    roles: list[str]


class TrustStore:
    """The root a device trusts: role keys and thresholds, revocations, version and expiry.

    One instance is shared by everything in an agent process (installer, command dispatcher); :meth:`update`
    swaps in a newer root under a lock, so every holder sees it at once.
    """

    def __init__(self, directory: Path, root: Metadata[Root]) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._set(root)

    # --- files -----------------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: Path,
        public_keys: Sequence[Path],
        *,
        threshold: int = 1,
        expires: datetime | None = None,
    ) -> TrustStore:
        """A store where the keys ``public_keys`` hold root, bundle and command alike (tests, one-key setups).

        Production stores give each role its own keys: ``edgepack trust init --root … --bundle … --command …``
        (:func:`edgepack.trust_root.create`). Version 1 is unsigned: it is trusted because it is installed
        on the device (TUF §5.2); every later version must be signed (rule 8).
        """
        from edgepack.trust_root import create  # the authoring side; it decides nothing

        verify_keys = [(VerifyKey.load(Path(p)), Path(p).stem) for p in public_keys]
        if not verify_keys:
            raise TrustStoreError("a trust store needs at least one public key (--key PUB)")
        spec = {ROOT_ROLE: verify_keys, **{r: verify_keys for r in ROLES}}
        return create(directory, spec, thresholds=dict.fromkeys(ALL_ROLES, threshold), expires=expires)

    @classmethod
    def load(cls, directory: Path) -> TrustStore:
        directory = Path(directory)
        path = directory / TRUST_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise TrustStoreError(
                f"no trust store at {directory} ({TRUST_FILE} missing); create one with "
                "'edgepack trust init DIR --root PUB --bundle PUB --command PUB'"
            ) from exc
        except OSError as exc:
            raise TrustStoreError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if b'"keys"' in data and b'"signed"' not in data:
            raise TrustStoreError(
                f"{path} is a trust store of edgepack 0.1 (no TUF root); convert it with "
                "'edgepack trust migrate DIR --root ROOT.pub' (same keys), or make a new one with 'edgepack trust init'"
            )
        return cls(directory, parse_root(data, source=str(path)))

    def save(self) -> None:
        """Write the current root: ``roots/N.root.json`` first, then ``trust.json`` (each atomically)."""
        data = self.root_bytes()
        atomic_write_bytes(self.directory / HISTORY_DIR / f"{self.version}.root.json", data)
        atomic_write_bytes(self.directory / TRUST_FILE, data)

    # --- what it holds ---------------------------------------------------------------------------

    @property
    def root(self) -> Metadata[Root]:
        return self._root

    @property
    def version(self) -> int:
        return self._root.signed.version

    @property
    def expires(self) -> datetime:
        return self._root.signed.expires

    @property
    def keys(self) -> dict[str, TrustedKey]:
        """Every key the root names, with the roles it holds (for display)."""
        out: dict[str, TrustedKey] = {}
        root = self._root.signed
        holders = [(ROOT_ROLE, root.roles[ROOT_ROLE].keyids, root.keys)]
        holders += [(n, r.keyids, self._roles.keys) for n, r in (self._roles.roles or {}).items()]
        for role, keyids, keys in holders:
            for kid in keyids:
                tkey = keys[kid]
                entry = out.setdefault(
                    kid, TrustedKey(VerifyKey(Ed25519PublicKey.from_public_bytes(bytes.fromhex(tkey.keyval["public"]))),
                                    key_name(tkey), [])
                )  # fmt: skip
                entry.roles.append(role)
        return out

    @property
    def thresholds(self) -> dict[str, int]:
        out = {ROOT_ROLE: self._root.signed.roles[ROOT_ROLE].threshold}
        out.update({n: r.threshold for n, r in (self._roles.roles or {}).items()})
        return out

    @property
    def revoked(self) -> set[str]:
        return set(self._revoked)

    def root_bytes(self) -> bytes:
        return self._root.to_bytes()

    def is_expired(self, now: datetime | None = None) -> bool:
        return self._root.signed.is_expired(now or utc_now())

    def describe(self, now: datetime | None = None) -> dict[str, Any]:
        """Version, expiry and whether it expired (device state, ``agent status``)."""
        return {"version": self.version, "expires": _expiry_text(self._root.signed), "expired": self.is_expired(now)}

    def resolve(self, kid_or_prefix: str) -> str:
        """A key id from its first 8+ characters (among the keys the root names and the revoked ones)."""
        if len(kid_or_prefix) < 8:
            raise TrustStoreError("give at least 8 characters of the key id")
        known = set(self.keys) | self._revoked
        matches = [k for k in known if k.startswith(kid_or_prefix.lower())]
        if len(matches) != 1:
            names = ", ".join(short_id(k) for k in sorted(known))
            raise TrustStoreError(f"key id {kid_or_prefix!r} matches {len(matches)} keys (known: {names})")
        return matches[0]

    def chain(self, since: int = 1) -> list[bytes]:
        """The root versions ``since``.. current this store holds in ``roots/`` (what a device walks)."""
        out = []
        for version in range(max(1, since), self.version + 1):
            path = self.directory / HISTORY_DIR / f"{version}.root.json"
            if path.is_file():
                out.append(path.read_bytes())
            elif version == self.version:
                out.append(self.root_bytes())
        return out

    # --- rules -----------------------------------------------------------------------------------

    def check_fresh(self, what: str = "anything new", now: datetime | None = None) -> None:
        """Rule 9: raise ExpiredTrustError when the root has expired."""
        if self.is_expired(now):
            raise ExpiredTrustError(
                f"this device's trust root (version {self.version}) expired at {_expiry_text(self._root.signed)}: "
                f"it keeps serving the installed models but accepts {what} only after a fresh root arrives "
                "('edgepack trust rotate' then 'edgepack fleet trust push', or 'edgepack agent trust-update')"
            )

    def verify(
        self, kind: str, document: bytes, signatures: Sequence[Signature], role: str, *, installed: bool = False
    ) -> list[str]:
        """Check ``signatures`` over ``document`` for ``role``; return the key ids that counted.

        ``installed``: the document is already on the device (a stored bundle checked again at boot or for a
        rollback), so an expired root does not stop it (rule 9). Raises the most specific
        VerificationError when the document is not trusted (rules 1-4, 9).
        """
        if role not in ROLES:
            raise TrustStoreError(f"trust store has no role {role!r}; roles are {', '.join(ROLES)}")
        if not installed:
            self.check_fresh(f"new {role}s")
        with self._lock:
            delegator, roles, revoked, known = self._delegator, self._roles, self._revoked, self._known
        message = signed_message(kind, document)
        threshold = roles.roles[role].threshold  # type: ignore[index]
        holders = set(roles.roles[role].keyids)  # type: ignore[index]
        tuf_sigs: dict[str, TufSignature] = {}
        unknown: list[str] = []
        revoked_signers: list[str] = []
        for sig in {s.keyid: s for s in signatures}.values():
            if sig.keyid in revoked:
                revoked_signers.append(sig.keyid)
                continue
            key = known.get(sig.keyid)
            if key is None:
                unknown.append(sig.keyid)
                continue
            tsig = TufSignature(sig.keyid, sig.sig.hex())
            tuf_sigs[sig.keyid] = tsig
            if sig.keyid not in holders:  # a key of another role: TUF will not look at it, rule 2 does
                try:
                    key.verify_signature(tsig, message)
                except Exception as exc:  # securesystemslib's UnverifiedSignatureError and friends
                    raise self._altered(kind, sig.keyid, key) from exc
        result = delegator.get_verification_result(role, message, tuf_sigs)  # each signature verified once
        for kid in result.unsigned:
            if kid in tuf_sigs:  # a holder's signature that TUF found invalid: rule 2
                raise self._altered(kind, kid, known[kid])
        counted = sorted(result.signed)
        if result.verified:
            for kid in revoked_signers:
                log.warning("ignored a signature by revoked key %s", short_id(kid))
            return counted
        if revoked_signers:
            raise RevokedKeyError(
                f"signed by revoked key {', '.join(short_id(k) for k in revoked_signers)}; "
                f"{len(counted)} of {threshold} required signatures remain — re-sign with a trusted key"
            )
        if unknown and not counted:
            holders = roles.roles[role].keyids  # type: ignore[index]
            raise UnknownKeyError(
                f"signed by unknown key {', '.join(short_id(k) for k in unknown)}; this trust store (root version "
                f"{self.version}) trusts {', '.join(short_id(k) for k in holders) or 'no key'} for {role!r}"
            )
        other_role = [f"{short_id(k)} ({key_name(known[k]) or 'unnamed'})" for k in tuf_sigs if k not in holders]
        raise ThresholdNotMetError(
            f"{len(counted)} of {threshold} required signatures for role {role!r}"
            + (f"; signed by {', '.join(other_role)}, which does not hold the {role!r} role" if other_role else "")
            + "; add signatures with 'edgepack sign BUNDLE --key KEY'"
        )

    @staticmethod
    def _altered(kind: str, kid: str, key: Key) -> SignatureInvalidError:
        return SignatureInvalidError(
            f"signature by key {short_id(kid)} ({key_name(key) or 'unnamed'}) does not match the {kind}: the "
            f"{kind} or its signature was altered"
        )

    def update(self, roots: Sequence[bytes | dict[str, Any]], now: datetime | None = None) -> list[int]:
        """Walk a chain of newer roots (rule 8) and make the newest one current; returns the versions applied.

        Versions this store already holds are skipped. Nothing is written unless the whole chain verifies
        and its newest root is not expired; then each new version goes to ``roots/`` and ``trust.json`` is
        replaced last (temp file, fsync, rename, directory fsync), so a power cut leaves the old root or
        the new one.
        """
        try:
            parsed = [parse_root(r, source="trust update") for r in roots]
        except TrustUpdateError:
            raise
        except TrustStoreError as exc:  # a malformed root is a refused update (code trust_update)
            raise TrustUpdateError(str(exc)) from exc
        with self._lock:
            current = self._root
            chain = sorted((md for md in parsed if md.signed.version > current.signed.version),
                           key=lambda md: md.signed.version)  # fmt: skip
            if not chain:
                return []
            for md in chain:
                check_rotation(current, md)
                current = md
            newest = chain[-1].signed
            if newest.is_expired(now or utc_now()):
                raise TrustUpdateError(
                    f"trust root version {newest.version} expired at {_expiry_text(newest)}; a device accepts only "
                    "an unexpired root — make a fresh one with 'edgepack trust rotate --expires …'"
                )
            for md in chain:
                atomic_write_bytes(self.directory / HISTORY_DIR / f"{md.signed.version}.root.json", md.to_bytes())
            atomic_write_bytes(self.directory / TRUST_FILE, chain[-1].to_bytes())
            self._set(chain[-1])
        versions = [md.signed.version for md in chain]
        log.info("trust root now version %d (applied %s)", versions[-1], versions)
        return versions

    # --- internals -------------------------------------------------------------------------------

    def _set(self, root: Metadata[Root]) -> None:
        roles = roles_of(root.signed)
        self._root = root
        self._roles = roles
        self._revoked = revoked_of(root.signed)
        self._delegator = Targets(version=root.signed.version, expires=root.signed.expires, delegations=roles)
        self._known: dict[str, Key] = {**root.signed.keys, **roles.keys}


# --- bundle and command rules that TUF does not have ---------------------------------------------


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


def parse_expires(text: str | None, default: timedelta | None, now: datetime | None = None) -> datetime | None:
    """An ``--expires`` value: a duration (``90d``, ``12h``, ``2w``), an ISO 8601 time, or ``never``.

    None (the option not given) means ``default`` from now; ``never`` means no expiry at all.
    """
    now = now or utc_now()
    if text is None:
        return now + default if default is not None else None
    text = text.strip()
    if text.lower() == "never":
        return None
    match = _DURATION.match(text.lower())
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        if seconds <= 0:
            raise TrustStoreError(f"--expires {text!r} must be in the future")
        return now + timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise TrustStoreError(
            f"--expires {text!r} is neither a duration (90d, 12h, 2w), an ISO 8601 time nor 'never'"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    if moment <= now:
        raise TrustStoreError(f"--expires {text!r} is in the past")
    return moment


def utc(moment: datetime) -> datetime:
    """``moment`` in UTC, whole seconds (TUF expiry has second precision)."""
    return moment.astimezone(timezone.utc).replace(microsecond=0)
