"""The fleet's certificate authorities — one for devices and the broker, one for operators — that sign every TLS
certificate of the fleet, and the record of what they issued and revoked.

A fleet directory made by ``edgepack fleet ca init --out DIR`` holds::

    DIR/ca.pem            the fleet CA: signs devices' and the broker's certificates (every device, every
                          operator and the broker trust it as ``ca.pem``)
    DIR/ca.key            its private key, 0600 (keep this directory offline; it mints identities)
    DIR/operators-ca.pem  the operator CA: signs operators' certificates only
    DIR/operators-ca.key  its private key, 0600
    DIR/issued.sqlite     every certificate issued (serial, common name, kind, labels/groups, validity) and
                          every revocation (the CRLs ``broker-config`` writes)

Why two CAs: the broker's device listener replaces each client's MQTT client id with its CN
(``use_username_as_clientid``), so a compromised device cannot connect as another device's client id and knock it
off the broker. Operator tools open several connections at once with their own client ids, so operators
connect on a second listener that keeps client ids — and that listener trusts only the operator CA, so a
device certificate cannot be used there (``fleet/broker_config.py``).

The broker authenticates a client by its certificate (``require_certificate true``) and takes the
certificate's common name as the MQTT user name (``use_identity_as_username true``), so **the CN is the
identity**: a device's CN is its device id, an operator's CN its operator name. :class:`FleetCA` therefore
refuses to issue one CN for two kinds (a device named like the operator would get the operator's ACL).

Built on ``cryptography``'s x509 API (no ``openssl`` shell-outs): keys are ECDSA P-256, which every TLS stack on
our device classes (OpenSSL 1.1+/3, mosquitto, paho) speaks; signatures SHA-256.

The record is SQLite (stdlib ``sqlite3``, WAL) because the ACL the broker enforces is generated from it
(``fleet/broker_config.py``): a device's groups are what the operator provisioned, never what a device claims
in its own state.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgepack.certs import common_name
from edgepack.errors import FleetIdentityError
from edgepack.fsutil import atomic_write_bytes, ensure_dir

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
OPERATOR_CA_CERT = "operators-ca.pem"
OPERATOR_CA_KEY = "operators-ca.key"
ISSUED_DB = "issued.sqlite"
CA_DAYS = 3650  # ten years: the CA outlives many device generations; rotate by issuing a new CA and re-provisioning
LEAF_DAYS = 1095  # three years: a device re-provisioned (or an image rebuilt) within its service cycle

Kind = Literal["device", "operator", "broker"]
KINDS: tuple[Kind, ...] = ("device", "operator", "broker")


@dataclass(frozen=True)
class Issued:
    """One certificate the CA issued, as recorded in ``issued.sqlite``."""

    serial: int
    cn: str
    kind: Kind
    labels: dict[str, str]
    groups: list[str]
    not_before: datetime.datetime
    not_after: datetime.datetime
    revoked_at: datetime.datetime | None = None


@dataclass(frozen=True)
class LeafCertificate:
    """A key and the certificate the CA signed for it, with both as PEM bytes."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _key_usage(*, authority: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs only; a leaf (TLS client or server, ECDHE) makes signatures only."""
    flags = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "encipher_only",
         "decipher_only"),
        False,
    )  # fmt: skip
    return x509.KeyUsage(digital_signature=not authority, key_cert_sign=authority, crl_sign=authority, **flags)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


@dataclass(frozen=True)
class _Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _new_authority(directory: Path, cert_name: str, key_name: str, name: str, days: int) -> _Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(authority=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    atomic_write_bytes(directory / key_name, _key_pem(key), mode=0o600)
    atomic_write_bytes(directory / cert_name, cert.public_bytes(serialization.Encoding.PEM))
    return _Authority(key, cert)


def _load_authority(directory: Path, cert_name: str, key_name: str) -> _Authority:
    try:
        key_bytes = (directory / key_name).read_bytes()
        cert_bytes = (directory / cert_name).read_bytes()
    except FileNotFoundError as exc:
        raise FleetIdentityError(
            f"{directory} holds no fleet CA ({Path(exc.filename).name} is missing): "
            f"create one with 'edgepack fleet ca init --out {directory}'"
        ) from exc
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
        cert = x509.load_pem_x509_certificate(cert_bytes)
    except (ValueError, TypeError) as exc:
        raise FleetIdentityError(f"{directory / cert_name} or its key cannot be read: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FleetIdentityError(f"{directory / key_name} is not an ECDSA key made by 'edgepack fleet ca init'")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise FleetIdentityError(f"{directory / key_name} is not the key of {directory / cert_name}")
    return _Authority(key, cert)


class FleetCA:
    """The fleet's CAs in ``directory``: :meth:`init` creates them, :meth:`load` opens them, :meth:`issue` signs."""

    def __init__(self, directory: Path, fleet: _Authority, operators: _Authority) -> None:
        self.directory = directory
        self._fleet = fleet
        self._operators = operators
        self.cert = fleet.cert  # the fleet CA's: what devices, operators and the broker trust
        self._db_path = directory / ISSUED_DB
        with closing(self._connect()) as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS issued (serial TEXT PRIMARY KEY, cn TEXT NOT NULL, kind TEXT NOT NULL, "
                "labels TEXT NOT NULL, groups_ TEXT NOT NULL, not_before TEXT NOT NULL, not_after TEXT NOT NULL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS issued_cn ON issued (cn)")
            db.execute("CREATE TABLE IF NOT EXISTS revoked (serial TEXT PRIMARY KEY, revoked_at TEXT NOT NULL)")

    # --- opening ---------------------------------------------------------------------------------

    @classmethod
    def init(cls, directory: Path, *, name: str = "edgepack fleet CA", days: int = CA_DAYS) -> FleetCA:
        """Create the fleet CA and the operator CA in ``directory`` (which must not hold them already)."""
        present = [n for n in (CA_CERT, CA_KEY, OPERATOR_CA_CERT, OPERATOR_CA_KEY) if (directory / n).exists()]
        if present:
            raise FleetIdentityError(
                f"{directory} already holds a fleet CA ({', '.join(present)}); use it, or choose another --out"
            )
        if days < 1:
            raise FleetIdentityError(f"a CA valid for {days} days is no CA; give --days 1 or more")
        ensure_dir(directory)
        fleet = _new_authority(directory, CA_CERT, CA_KEY, name, days)
        operators = _new_authority(directory, OPERATOR_CA_CERT, OPERATOR_CA_KEY, f"{name} (operators)", days)
        return cls(directory, fleet, operators)

    @classmethod
    def load(cls, directory: Path) -> FleetCA:
        """Open the CAs in ``directory``; a clear error when one is missing or its files do not belong together."""
        fleet = _load_authority(directory, CA_CERT, CA_KEY)
        return cls(directory, fleet, _load_authority(directory, OPERATOR_CA_CERT, OPERATOR_CA_KEY))

    @property
    def operators_cert_pem(self) -> bytes:
        """The operator CA's certificate (the broker's operator listener trusts only this one)."""
        return self._operators.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    # --- issuing ---------------------------------------------------------------------------------

    def issue(
        self,
        cn: str,
        kind: Kind,
        *,
        days: int = LEAF_DAYS,
        hosts: Sequence[str] = (),
        labels: dict[str, str] | None = None,
        groups: Sequence[str] = (),
    ) -> LeafCertificate:
        """A new key and a certificate with common name ``cn``, signed by this CA, recorded in ``issued.sqlite``.

        ``device`` and ``operator`` certificates are for TLS clients, ``broker`` for the TLS server (``hosts``:
        its DNS names and IP addresses, which clients check). A CN already issued for another kind is refused.
        """
        if kind not in KINDS:
            raise FleetIdentityError(f"unknown certificate kind {kind!r}; one of {', '.join(KINDS)}")
        if days < 1:
            raise FleetIdentityError(f"a certificate valid for {days} days cannot be used; give --days 1 or more")
        if kind == "broker" and not hosts:
            raise FleetIdentityError("a broker certificate needs the host names clients reach it by (--host)")
        clash = [i for i in self.issued(cn=cn) if i.kind != kind]
        if clash:
            raise FleetIdentityError(
                f"{cn!r} already names a certificate of kind '{clash[0].kind}'; the broker takes the CN as the user "
                f"name, so one of kind '{kind}' may not share it — choose another name"
            )
        signer = self._operators if kind == "operator" else self._fleet
        now = _now()
        not_after = min(now + datetime.timedelta(days=days), signer.cert.not_valid_after_utc)
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "broker" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(signer.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(authority=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()), critical=False)
        )
        if hosts:
            builder = builder.add_extension(_san(hosts), critical=False)
        cert = builder.sign(signer.key, hashes.SHA256())
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO issued VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    str(cert.serial_number), cn, kind, json.dumps(labels or {}, sort_keys=True),
                    json.dumps(sorted(groups)), cert.not_valid_before_utc.isoformat(),
                    cert.not_valid_after_utc.isoformat(),
                ),
            )  # fmt: skip
        return LeafCertificate(key, cert)

    # --- the record ------------------------------------------------------------------------------

    def issued(self, *, cn: str | None = None, kind: Kind | None = None) -> list[Issued]:
        """Every certificate issued (oldest first), optionally only for ``cn`` and/or ``kind``."""
        query = (
            "SELECT i.serial, i.cn, i.kind, i.labels, i.groups_, i.not_before, i.not_after, r.revoked_at "
            "FROM issued i LEFT JOIN revoked r ON r.serial = i.serial WHERE 1=1"
        )
        args: list[str] = []
        if cn is not None:
            query, args = query + " AND i.cn = ?", [*args, cn]
        if kind is not None:
            query, args = query + " AND i.kind = ?", [*args, kind]
        with closing(self._connect()) as db:
            rows = db.execute(query + " ORDER BY i.not_before, i.rowid", args).fetchall()
        return [
            Issued(
                serial=int(serial), cn=name, kind=k, labels=json.loads(labels), groups=json.loads(groups),
                not_before=datetime.datetime.fromisoformat(nb), not_after=datetime.datetime.fromisoformat(na),
                revoked_at=datetime.datetime.fromisoformat(ra) if ra else None,
            )
            for serial, name, k, labels, groups, nb, na, ra in rows
        ]  # fmt: skip

    def current(self, kind: Kind) -> Iterator[Issued]:
        """Per CN of ``kind``, its latest certificate that is neither expired nor revoked (what the ACL is
        written from)."""
        latest: dict[str, Issued] = {}
        now = _now()
        for item in self.issued(kind=kind):
            if item.not_after > now and item.revoked_at is None:
                latest[item.cn] = item
        for cn in sorted(latest):
            yield latest[cn]

    def revoke(self, cn: str) -> list[Issued]:
        """Revoke every certificate of ``cn`` that is not revoked yet (a device retired, lost or compromised).

        The broker refuses them once it has the new CRL (:meth:`crl_pem`, written by ``broker-config``); to give
        the device a new identity, provision it again afterwards.
        """
        live = [i for i in self.issued(cn=cn) if i.revoked_at is None]
        if not live:
            known = self.issued(cn=cn)
            raise FleetIdentityError(
                f"no certificate of {cn!r} to revoke ({'all revoked already' if known else 'the CA never issued one'})"
            )
        now = _now().isoformat()
        with closing(self._connect()) as db, db:
            db.executemany("INSERT INTO revoked VALUES (?, ?)", [(str(i.serial), now) for i in live])
        serials = {i.serial for i in live}
        return [i for i in self.issued(cn=cn) if i.serial in serials]

    def crl_pem(self, *, operator: bool = False) -> bytes:
        """The certificate revocation list of the fleet CA (``operator``: the operator CA), signed by it.

        It stays valid as long as the CA (``next_update`` = the CA's expiry): the broker reads it from a file this
        CA writes, so freshness comes from rerunning ``broker-config``, not from a CRL distribution point.
        """
        signer = self._operators if operator else self._fleet
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(signer.cert.subject)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(signer.cert.not_valid_after_utc)
        )
        for item in self.issued():
            if item.revoked_at is None or (item.kind == "operator") != operator:
                continue
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(item.serial).revocation_date(item.revoked_at).build()
            )
        return builder.sign(signer.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def verify(self, cert: x509.Certificate, *, operator: bool = False) -> None:
        """Check that ``cert`` was signed by the fleet CA (``operator``: the operator CA) and is valid now;
        raises FleetIdentityError if not."""
        try:
            cert.verify_directly_issued_by((self._operators if operator else self._fleet).cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise FleetIdentityError(
                f"certificate of {common_name(cert)!r} was not issued by this CA ({exc!r})"
            ) from exc
        now = _now()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise FleetIdentityError(
                f"certificate of {common_name(cert)!r} is valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                f"{cert.not_valid_after_utc:%Y-%m-%d}, not now"
            )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._db_path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        return db
