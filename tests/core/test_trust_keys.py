"""Keys at rest: an encrypted private key round-trips with its passphrase (argument, env var, file, CLI) and
an encrypted key without a passphrase is a clear error, never a traceback."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack import errors
from edgepack import keys as keymod
from edgepack.keys import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV, SigningKey


@pytest.fixture(autouse=True)
def no_passphrase_sources(monkeypatch):
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    monkeypatch.delenv(PASSPHRASE_FILE_ENV, raising=False)
    monkeypatch.setattr(keymod, "_prompt", None)


def test_encrypted_key_round_trip(tmp_path, monkeypatch):
    key = SigningKey.generate()
    private, _ = key.save(tmp_path, "release", passphrase=b"correct horse")
    pem = private.read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem and key.key.private_bytes_raw() not in pem
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert SigningKey.load(private, b"correct horse").key_id == key.key_id
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    assert SigningKey.load(private).key_id == key.key_id
    monkeypatch.delenv(PASSPHRASE_ENV)
    (tmp_path / "pass.txt").write_text("correct horse\n")
    monkeypatch.setenv(PASSPHRASE_FILE_ENV, str(tmp_path / "pass.txt"))
    assert SigningKey.load(private).key_id == key.key_id


def test_missing_and_wrong_passphrase_are_clear_errors(tmp_path):
    private, _ = SigningKey.generate().save(tmp_path, "k", passphrase=b"secret")
    with pytest.raises(
        errors.KeyPassphraseError, match=f"is encrypted and no passphrase was given: set {PASSPHRASE_ENV}"
    ):
        SigningKey.load(private)
    with pytest.raises(errors.KeyPassphraseError, match="wrong passphrase"):
        SigningKey.load(private, b"guess")
    with pytest.raises(errors.KeyPassphraseError, match="empty passphrase"):
        SigningKey.generate().save(tmp_path, "e", passphrase=b"")
    plain, _ = SigningKey.generate().save(tmp_path, "plain")
    assert SigningKey.load(plain)  # an unencrypted key needs no passphrase


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in (PASSPHRASE_ENV, PASSPHRASE_FILE_ENV)}
    return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True,
                          env={**base, "COLUMNS": "200", **(env or {})}, stdin=subprocess.DEVNULL)  # fmt: skip


def test_cli_generate_encrypt_and_sign(tmp_path: Path, make_bundle):
    (tmp_path / "pass").write_text("s3cret\n")
    made = run("keys", "generate", "--out", str(tmp_path / "k"), "--name", "rel", "--encrypt",
               "--passphrase-file", str(tmp_path / "pass"))  # fmt: skip
    assert made.returncode == 0 and "encrypted" in made.stdout, made.stderr
    no_pass = run("keys", "generate", "--out", str(tmp_path / "k"), "--name", "other", "--encrypt")
    assert no_pass.returncode == 1 and "--encrypt needs a passphrase" in no_pass.stderr
    bundle, _ = make_bundle()
    refused = run("sign", str(bundle), "--key", str(tmp_path / "k" / "rel.key"))
    assert refused.returncode == 1 and "is encrypted and no passphrase was given" in refused.stderr
    assert "Traceback" not in refused.stderr
    signed = run("sign", str(bundle), "--key", str(tmp_path / "k" / "rel.key"),
                 env={PASSPHRASE_FILE_ENV: str(tmp_path / "pass")})  # fmt: skip
    assert signed.returncode == 0, signed.stderr
