"""The fleet CA, provisioning and the generated broker configuration, without a broker (tests/mqtt/test_broker_acl.py
runs the result on a real mosquitto): what is issued, by whom, where it is written, and what the ACL says."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from edgepack.cli import app
from edgepack.errors import FleetIdentityError
from edgepack.fleet.broker_config import render_acl, write_mosquitto
from edgepack.fleet.ca import FleetCA
from edgepack.fleet.provision import DEVICE_CERT, DEVICE_KEY, provision_device, provision_operator
from edgepack.protocol import Topics

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    return FleetCA.init(tmp_path / "ca")


def test_ca_init_writes_private_keys_for_the_owner_only_and_refuses_twice(ca, tmp_path):
    for name in ("ca.key", "operators-ca.key"):
        assert stat.S_IMODE((ca.directory / name).stat().st_mode) == 0o600
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(FleetIdentityError, match="already holds a fleet CA"):
        FleetCA.init(ca.directory)
    with pytest.raises(FleetIdentityError, match="fleet ca init"):
        FleetCA.load(tmp_path / "nothing")
    FleetCA.init(tmp_path / "other")
    (ca.directory / "ca.key").write_bytes((tmp_path / "other" / "ca.key").read_bytes())
    with pytest.raises(FleetIdentityError, match="is not the key of"):
        FleetCA.load(ca.directory)


def test_device_certificate_names_the_device_and_lands_where_the_image_takes_it(ca, tmp_path):
    done = provision_device(ca, "cam-7", tmp_path / "cam-7", labels={"group": "cams,doors", "site": "plant-3"})
    assert sorted(p.name for p in (tmp_path / "cam-7").iterdir()) == ["ca.pem", "device.key", "device.pem"]
    cert = _cert(done.cert)
    assert _cn(cert) == "cam-7"
    cert.verify_directly_issued_by(ca.cert)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    key = serialization.load_pem_private_key(done.key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert stat.S_IMODE(done.key.stat().st_mode) == 0o600
    assert done.ca.read_bytes() == ca.cert_pem
    assert done.groups == ["cams", "doors", "site=plant-3"]  # as the agent computes them
    [record] = ca.issued(cn="cam-7")
    assert record.kind == "device" and record.groups == done.groups and record.serial == cert.serial_number


def test_provisioned_files_match_the_firmware_layout_and_the_shipped_agent_config():
    sys.path.append(str(REPO / "scripts"))
    from firmware.context import Identity  # the build context's identity/ folder

    assert set(Identity(Path("c"), Path("k"), Path("a")).files()) == {DEVICE_CERT, DEVICE_KEY, "ca.pem"}
    for agent_toml in sorted((REPO / "firmware-images").glob("*/agent.toml")):
        broker = tomllib.loads(agent_toml.read_text())["broker"]
        assert (Path(broker["cert"]).name, Path(broker["key"]).name, Path(broker["ca"]).name) == (
            DEVICE_CERT,
            DEVICE_KEY,
            "ca.pem",
        ), agent_toml


def test_bad_names_labels_clashes_and_overwrites_are_refused(ca, tmp_path):
    with pytest.raises(FleetIdentityError, match="cannot be a device id"):
        provision_device(ca, "cam/7", tmp_path / "x")
    spaced = provision_device(ca, "cam-6", tmp_path / "cam-6", labels={"site": "plant 3", "line": "2"})
    assert spaced.groups == ["line=2"]  # like the agent: a label that cannot name a topic makes no group
    provision_operator(ca, "ops", tmp_path / "ops")
    with pytest.raises(FleetIdentityError, match="kind 'operator'"):
        provision_device(ca, "ops", tmp_path / "x")  # would get the operator's ACL
    provision_device(ca, "cam-7", tmp_path / "cam-7")
    first = (tmp_path / "cam-7" / DEVICE_KEY).read_bytes()
    with pytest.raises(FleetIdentityError, match="--force"):
        provision_device(ca, "cam-7", tmp_path / "cam-7")
    assert (tmp_path / "cam-7" / DEVICE_KEY).read_bytes() == first
    assert len(ca.issued(cn="cam-7")) == 1  # a refusal issues nothing
    provision_device(ca, "cam-7", tmp_path / "cam-7", labels={"group": "gates"}, force=True)
    assert (tmp_path / "cam-7" / DEVICE_KEY).read_bytes() != first
    assert [i.groups for i in ca.current("device") if i.cn == "cam-7"] == [["gates", "group=gates"]]  # the latest wins


def test_operator_certificate_comes_from_the_operator_ca_only(ca, tmp_path):
    done = provision_operator(ca, "ops", tmp_path / "ops")
    cert = _cert(done.cert)
    assert _cn(cert) == "ops"
    with pytest.raises(Exception):  # noqa: B017 - cryptography's InvalidSignature or ValueError
        cert.verify_directly_issued_by(ca.cert)  # not the fleet CA: a device listener would refuse it
    ca.verify(cert, operator=True)
    assert done.ca.read_bytes() == ca.cert_pem  # what the operator checks the broker's certificate with


def test_acl_confines_devices_to_their_own_topics_and_provisioned_groups(ca, tmp_path):
    provision_device(ca, "cam-1", tmp_path / "1", labels={"group": "cams"})
    provision_device(ca, "cam-2", tmp_path / "2")
    provision_operator(ca, "ops", tmp_path / "ops")
    acl = render_acl(Topics("fleet"), ca.current("device"), ca.current("operator"))
    lines = [line for line in acl.splitlines() if line and not line.startswith("#")]
    patterns = [line for line in lines if line.startswith("pattern")]
    assert "pattern read fleet/devices/%u/cmd" in patterns
    assert "pattern write fleet/devices/%u/state" in patterns and "pattern write fleet/devices/%u/events" in patterns
    assert not [p for p in patterns if p.startswith("pattern write") and "%u" not in p]  # nothing shared is writable
    assert not [p for p in patterns if "groups" in p]
    blocks = acl.split("\nuser ")[1:]
    cam1 = next(b for b in blocks if b.startswith("cam-1\n"))
    assert "topic read fleet/groups/cams/cmd" in cam1 and "topic read fleet/groups/group=cams/cmd" in cam1
    assert not [b for b in blocks if b.startswith("cam-2\n")]  # no groups: no user block
    ops = next(b for b in blocks if b.startswith("ops\n"))
    assert "topic write fleet/devices/+/cmd" in ops and "topic read fleet/devices/+/state" in ops
    assert "topic readwrite fleet/devices/+/state" not in ops  # only with operator_forget
    forget = render_acl(Topics("fleet"), [], ca.current("operator"), operator_forget=True)
    assert "topic readwrite fleet/devices/+/state" in forget


def test_broker_config_listeners_certificate_reuse_and_revocation(ca, tmp_path):
    provision_device(ca, "cam-1", tmp_path / "1", labels={"group": "cams"})
    with pytest.raises(FleetIdentityError, match="no operator certificate"):
        write_mosquitto(ca, tmp_path / "broker", hosts=["broker.example"])
    provision_operator(ca, "ops", tmp_path / "ops")
    files = write_mosquitto(ca, tmp_path / "broker", hosts=["broker.example", "10.0.0.5"])
    conf = files.conf.read_text().splitlines()
    assert conf.count("require_certificate true") == 2 and conf.count("use_identity_as_username true") == 2
    assert "use_username_as_clientid true" in conf and "allow_anonymous false" in conf
    assert f"acl_file {files.acl.resolve()}" in conf
    server = _cert(files.cert)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert write_mosquitto(ca, tmp_path / "broker", hosts=["broker.example"]).reused_cert
    assert not write_mosquitto(ca, tmp_path / "broker", hosts=["other.example"]).reused_cert  # a new name
    ca.revoke("cam-1")
    files = write_mosquitto(ca, tmp_path / "broker", hosts=["other.example"])
    assert "user cam-1" not in files.acl.read_text()
    crl = x509.load_pem_x509_crl((tmp_path / "broker" / "crl.pem").read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert [r.serial_number for r in crl] == [ca.issued(cn="cam-1")[0].serial]
    with pytest.raises(FleetIdentityError, match="all revoked already"):
        ca.revoke("cam-1")
    provision_operator(ca, "ops-2", tmp_path / "ops-2")
    ca.revoke("ops")  # an operator's revocation goes into the operator CA's list
    files = write_mosquitto(ca, tmp_path / "broker", hosts=["other.example"])
    assert "user ops\n" not in files.acl.read_text() and "user ops-2\n" in files.acl.read_text()
    operators_crl = x509.load_pem_x509_crl((tmp_path / "broker" / "operators-crl.pem").read_bytes())
    assert operators_crl.is_signature_valid(x509.load_pem_x509_certificate(ca.operators_cert_pem).public_key())  # type: ignore[arg-type]
    assert [r.serial_number for r in operators_crl] == [ca.issued(cn="ops")[0].serial]


def test_cli_from_ca_to_broker_config(tmp_path):
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    ca_dir = str(tmp_path / "ca")
    run("fleet", "ca", "init", "--out", ca_dir)
    run("fleet", "provision", "cam-9", "--ca", ca_dir, "-o", str(tmp_path / "cam-9"), "--label", "group=cams")
    run("fleet", "provision-operator", "ops", "--ca", ca_dir, "-o", str(tmp_path / "ops"))
    out = run("fleet", "broker-config", "mosquitto", "--ca", ca_dir, "-o", str(tmp_path / "b"), "--host", "b.example")
    assert "1 devices" in out
    assert "topic read edgepack/groups/cams/cmd" in (tmp_path / "b" / "acl").read_text()
    assert "cam-9" in run("fleet", "ca", "list", "--ca", ca_dir, "--json")
    assert "cam-9" in run("fleet", "revoke", "cam-9", "--ca", ca_dir)
