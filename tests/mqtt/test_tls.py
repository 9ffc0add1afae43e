"""mqtts://: a mosquitto that requires TLS and a client certificate, reached with --ca/--cert/--key."""

from __future__ import annotations

import datetime
import ipaddress
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgepack.errors import BrokerConnectionError
from edgepack.mqtt import MqttClient, MqttOptions
from tests.mqtt.broker import Mosquitto, find_mosquitto

pytestmark = pytest.mark.mqtt


def _issue(directory: Path, name: str, issuer: tuple | None = None, *, ca: bool = False) -> tuple:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (issuer[2], issuer[0]) if issuer else (subject, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return key, cert, subject


def test_mqtts_with_a_client_certificate(tmp_path):
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed")
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = _issue(pki, "ca", ca=True)
    _issue(pki, "broker", ca)
    _issue(pki, "device", ca)
    broker = Mosquitto(
        binary,
        tmp_path / "mosquitto",
        extra_config=(f"cafile {pki / 'ca.pem'}", f"certfile {pki / 'broker.pem'}", f"keyfile {pki / 'broker.key'}",
                      "require_certificate true"),
    )  # fmt: skip
    broker.start()
    try:
        url = f"mqtts://127.0.0.1:{broker.port}"
        got = threading.Event()
        options = MqttOptions(
            url=url, client_id="device", ca=pki / "ca.pem", cert=pki / "device.pem", key=pki / "device.key"
        )
        client = MqttClient(options, on_message=lambda m: got.set())
        client.subscribe(["t/x"])
        client.connect(10)
        assert client.protocol == "5"
        client.wait_published([client.publish("t/x", b"over TLS")], 10)
        assert got.wait(10)
        client.stop()
        anonymous = MqttClient(MqttOptions(url=url, client_id="nobody", ca=pki / "ca.pem"))
        with pytest.raises(BrokerConnectionError):
            anonymous.connect(1)  # the broker requires a client certificate
    finally:
        broker.stop()
