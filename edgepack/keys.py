"""Ed25519 signing and verifying keys, their files, and key ids.

A key id is the hex sha256 of the raw 32-byte public key, so it is derived from the key itself and the
same everywhere. Private keys are stored as PKCS#8 PEM with mode 0600 (``NAME.key``), public keys as
SubjectPublicKeyInfo PEM (``NAME.pub``). Signing and verification use ``cryptography``.

Keys at rest: ``save(..., passphrase=...)`` encrypts the private key with ``cryptography``'s
``BestAvailableEncryption`` (PKCS#8, scrypt-derived AES-256 today). Loading an encrypted key needs its
passphrase, looked up in this order: the ``passphrase`` argument, ``$EDGEPACK_KEY_PASSPHRASE``, the file
named by ``$EDGEPACK_KEY_PASSPHRASE_FILE``, then the prompt the CLI installs (:func:`set_passphrase_prompt`,
only on a terminal). With none of them, :class:`~edgepack.errors.KeyPassphraseError` says how to give one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgepack.errors import KeyFileError, KeyPassphraseError

SHORT_ID = 12
PASSPHRASE_ENV = "EDGEPACK_KEY_PASSPHRASE"
PASSPHRASE_FILE_ENV = "EDGEPACK_KEY_PASSPHRASE_FILE"
ENCRYPTED_MARKER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"

_prompt: Callable[[Path], bytes | None] | None = None


def set_passphrase_prompt(prompt: Callable[[Path], bytes | None] | None) -> None:
    """Install (or remove) the last resort for an encrypted key's passphrase: the CLI's terminal prompt."""
    global _prompt
    _prompt = prompt


def read_passphrase_file(path: Path) -> bytes:
    """A passphrase file's first line (a trailing newline is not part of the passphrase)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyPassphraseError(f"cannot read passphrase file {path}: {exc.strerror}") from exc
    passphrase = data.splitlines()[0] if data.strip() else b""
    if not passphrase:
        raise KeyPassphraseError(f"passphrase file {path} is empty")
    return passphrase


def _find_passphrase(path: Path) -> bytes | None:
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if os.environ.get(PASSPHRASE_FILE_ENV):
        return read_passphrase_file(Path(os.environ[PASSPHRASE_FILE_ENV]))
    return _prompt(path) if _prompt is not None else None


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
    def load(cls, path: Path, passphrase: bytes | None = None) -> SigningKey:
        data = _read_key_file(path)
        password = None
        if ENCRYPTED_MARKER in data:
            password = passphrase if passphrase is not None else _find_passphrase(Path(path))
            if password is None:
                raise KeyPassphraseError(
                    f"{path} is encrypted and no passphrase was given: set {PASSPHRASE_ENV}, or "
                    f"{PASSPHRASE_FILE_ENV}=FILE, or run from a terminal to be asked for it"
                )
        try:
            key = serialization.load_pem_private_key(data, password=password)
        except ValueError as exc:
            if password is not None:
                raise KeyPassphraseError(f"cannot decrypt {path}: wrong passphrase (or a damaged key file)") from exc
            raise KeyFileError(
                f"{path} is not a PEM private key ({exc}); make one with: edgepack keys generate --out DIR"
            ) from exc
        except TypeError as exc:
            raise KeyFileError(
                f"{path} is not a PEM private key ({exc}); make one with: edgepack keys generate --out DIR"
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

    def save(self, directory: Path, name: str, *, passphrase: bytes | None = None) -> tuple[Path, Path]:
        """Write ``NAME.key`` (mode 0600; encrypted when ``passphrase`` is given) and ``NAME.pub``.

        Refuses to overwrite an existing key.
        """
        directory.mkdir(parents=True, exist_ok=True)
        private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
        for path in (private_path, public_path):
            if path.exists():
                raise KeyFileError(f"{path} already exists; choose another --name or remove it first")
        if passphrase is not None and not passphrase:
            raise KeyPassphraseError("an empty passphrase would not protect the key; give a real one")
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        )
        pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
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
