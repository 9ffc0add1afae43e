"""Ed25519 signing and verifying keys, their files, and key ids.

A key id is the hex sha256 of the raw 32-byte public key, so it is derived from the key itself and the
same everywhere. Private keys are stored as unencrypted PKCS#8 PEM with mode 0600 (``NAME.key``), public
keys as SubjectPublicKeyInfo PEM (``NAME.pub``). Signing and verification use ``cryptography``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgepack.errors import KeyFileError

SHORT_ID = 12


def key_id(public_raw: bytes) -> str:
    """The key id of a raw Ed25519 public key."""
    return hashlib.sha256(public_raw).hexdigest()


def short_id(kid: str) -> str:
    return kid[:SHORT_ID] + "…"


@dataclass(frozen=True)
class VerifyKey:
    """An Ed25519 public key."""

    key: Ed25519PublicKey

    @classmethod
    def load(cls, path: Path) -> VerifyKey:
        return cls.from_pem(_read_key_file(path), source=str(path))

    @classmethod
    def from_pem(cls, data: bytes, *, source: str = "public key") -> VerifyKey:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise KeyFileError(f"{source} is not a PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{source} is not an Ed25519 key (edgepack signs with Ed25519 only)")
        return cls(key)

    @property
    def raw(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    def to_pem(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def verifies(self, signature: bytes, message: bytes) -> bool:
        try:
            self.key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key."""

    key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        data = _read_key_file(path)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(
                f"{path} is not an unencrypted PEM private key ({exc}); make one with: edgepack keys generate --out DIR"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path} is not an Ed25519 private key (edgepack signs with Ed25519 only)")
        return cls(key)

    @property
    def public(self) -> VerifyKey:
        return VerifyKey(self.key.public_key())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    def save(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write ``NAME.key`` (mode 0600) and ``NAME.pub``; refuse to overwrite an existing key."""
        directory.mkdir(parents=True, exist_ok=True)
        private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
        for path in (private_path, public_path):
            if path.exists():
                raise KeyFileError(f"{path} already exists; choose another --name or remove it first")
        pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        public_path.write_bytes(self.public.to_pem())
        return private_path, public_path


def _read_key_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
