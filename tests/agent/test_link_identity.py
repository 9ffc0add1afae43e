"""The link warns when the device id differs from its client certificate's CN (the broker's ACL names a
device by its certificate, so such a device's state and events would be refused without a word)."""

from __future__ import annotations

import datetime
import logging

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgepack.agent.link.core import _warn_if_certificate_names_another_device


def _cert(path, cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_warns_on_a_certificate_for_another_device(tmp_path, caplog):
    cert = _cert(tmp_path / "device.pem", "cam-2")
    with caplog.at_level(logging.WARNING, logger="edgepack.agent.link.core"):
        _warn_if_certificate_names_another_device(cert, "cam-1")
    assert "differs from its certificate's CN 'cam-2'" in caplog.text


def test_quiet_when_they_agree_or_there_is_no_certificate(tmp_path, caplog):
    cert = _cert(tmp_path / "device.pem", "cam-1")
    with caplog.at_level(logging.WARNING, logger="edgepack.agent.link.core"):
        _warn_if_certificate_names_another_device(cert, "cam-1")
        _warn_if_certificate_names_another_device(None, "cam-1")
    assert caplog.text == ""


def test_an_unreadable_certificate_is_named(tmp_path, caplog):
    (tmp_path / "bad.pem").write_text("not a certificate")
    with caplog.at_level(logging.WARNING, logger="edgepack.agent.link.core"):
        _warn_if_certificate_names_another_device(tmp_path / "bad.pem", "cam-1")
    assert "cannot read the client certificate" in caplog.text
