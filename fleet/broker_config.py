"""A mosquitto configuration for a fleet: TLS listeners that admit only certificates of the fleet's CAs, and an
ACL that confines every device to its own topics.

``edgepack fleet broker-config mosquitto --ca DIR -o OUT --host broker.example`` writes::

    OUT/mosquitto.conf     two TLS listeners with require_certificate and use_identity_as_username, one acl_file:
                           8883 for devices (use_username_as_clientid: the client id is forced to the CN, so a
                           device cannot take over another's connection), 8884 for operators (own client ids;
                           only certificates of the operator CA get through its TLS handshake)
    OUT/acl                the ACL: ``pattern`` lines with ``%u`` for every device, ``user`` blocks per device
                           (its groups) and per operator
    OUT/server.pem/.key    the broker's certificate from the fleet CA (names = --host; reused while valid)
    OUT/ca.pem             the fleet CA: the device listener checks client certificates against it
    OUT/operators-ca.pem   the operator CA: the operator listener checks client certificates against it
    OUT/crl.pem            the certificates each CA revoked (``edgepack fleet revoke``), refused at the TLS
    OUT/operators-crl.pem  handshake

**Why the ACL looks like this** (docs/broker-acl.md has the long version). With
``use_identity_as_username true`` the MQTT user name is the client certificate's CN, which the CA set to the
device id, so ``%u`` in a ``pattern`` line is a name the device cannot choose. Patterns apply to every user,
so one set of lines gives each device read access to ``{prefix}/devices/{itself}/cmd`` (and ``capture/ctl``) and
write access to its own ``state``, ``events`` and ``capture``, plus read access to ``bundles/+/index`` and
``chunks/+`` (content-addressed and verified against the signed command, so reading them is harmless). The
topics are made with :class:`edgepack.protocol.Topics`, so the ACL follows the protocol's topic tree.

mosquitto substitutes only ``%u`` and ``%c`` in patterns, so *group* command topics cannot come from a pattern.
They are written per device, a ``user`` block with ``topic read {prefix}/groups/{group}/cmd`` (and ``…/trust``)
per group,
from the groups recorded when the device was provisioned (:mod:`edgepack.fleet.ca`'s ``issued.sqlite``) — never
from the groups a device claims in its own retained state, which a compromised device could change. After
provisioning, run this again and reload mosquitto (``SIGHUP``; it rereads the ACL file).

The operator (its own certificate and CN) gets write access to command, trust, index, chunk and capture-control
topics, read access to states, events and captures, and its ``operators/+/sync`` marker topic. Clearing a device's retained state
(``fleet forget``) needs write access to ``devices/+/state``; that would let a stolen operator certificate
fake device states, so it is only granted with ``operator_forget`` (``--operator-forget``).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgepack.errors import FleetIdentityError
from edgepack.fleet.ca import CA_CERT, OPERATOR_CA_CERT, FleetCA, Issued
from edgepack.fsutil import atomic_write_bytes, ensure_dir
from edgepack.protocol import DEFAULT_PREFIX, Topics

log = logging.getLogger(__name__)

CONF, ACL = "mosquitto.conf", "acl"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CRL, OPERATOR_CRL = "crl.pem", "operators-crl.pem"
_NAME = "edgepack-acl-name"  # a valid device/group name that _level replaces with %u or +
DEFAULT_PORT = 8883
DEFAULT_OPERATOR_PORT = 8884


@dataclass(frozen=True)
class BrokerFiles:
    """The files :func:`write_mosquitto` wrote, and who the ACL names."""

    conf: Path
    acl: Path
    cert: Path
    key: Path
    ca: Path
    devices: list[str]
    operators: list[str]
    reused_cert: bool


def _level(topic_of: Callable[[str], str], value: str) -> str:
    """``topic_of``'s topic with ``value`` (``%u``, ``+``) as the name: the topic tree stays edgepack.protocol's."""
    return topic_of(_NAME).replace(_NAME, value)


def render_acl(
    topics: Topics, devices: Iterable[Issued], operators: Iterable[Issued], *, operator_forget: bool = False
) -> str:
    """The mosquitto ACL file for ``devices`` and ``operators`` (see the module docstring for the rules)."""
    t = topics
    lines = [
        "# edgepack broker ACL, written by 'edgepack fleet broker-config mosquitto' from the fleet CA's record.",
        "# User names are client-certificate CNs (use_identity_as_username): a device's CN is its device id.",
        "# Anything not granted here is denied. See docs/broker-acl.md.",
        "",
        "# every client, by its own CN (pattern lines apply to all users): its own command and capture-control",
        "# topics, its own state, events and captures, and the content-addressed bundle indexes and chunks",
        "# (mosquitto warns that the last two patterns hold no %u: they are meant for every user)",
        f"pattern read {_level(t.device_command, '%u')}",
        f"pattern read {_level(t.capture_control, '%u')}",
        f"pattern write {_level(t.state, '%u')}",
        f"pattern write {_level(t.events, '%u')}",
        f"pattern write {_level(t.capture, '%u')}",
        f"pattern read {t.index('+')}",
        f"pattern read {t.chunk('+')}",
    ]
    for device in devices:
        if not device.groups:
            continue
        lines += [
            "",
            f"# device {device.cn}: the command and trust topics of the groups it was provisioned in",
            f"user {device.cn}",
        ]
        for group in device.groups:
            lines += [f"topic read {t.group_command(group)}", f"topic read {t.group_trust(group)}"]
    for operator in operators:
        lines += [
            "",
            f"# operator {operator.cn}: publishes commands, trust updates, indexes and chunks; reads states, events",
            "# and captures",
            f"user {operator.cn}",
            f"topic write {_level(t.device_command, '+')}",
            f"topic write {_level(t.group_command, '+')}",
            f"topic write {_level(t.group_trust, '+')}",
            f"topic write {t.index('+')}",
            f"topic write {t.chunk('+')}",
            f"topic write {_level(t.capture_control, '+')}",
            f"topic {'readwrite' if operator_forget else 'read'} {_level(t.state, '+')}",
            f"topic read {_level(t.events, '+')}",
            f"topic read {_level(t.capture, '+')}",
            f"topic readwrite {_level(t.operator_sync, '+')}",
        ]
    return "\n".join(lines) + "\n"


def render_conf(
    directory: Path, *, port: int = DEFAULT_PORT, operator_port: int = DEFAULT_OPERATOR_PORT, bind: str | None = None
) -> str:
    """mosquitto.conf for the device and operator TLS listeners whose files live in ``directory`` (on the broker)."""
    at = f" {bind}" if bind else ""

    def listener(number: int, cafile: str, crlfile: str) -> list[str]:
        return [
            f"listener {number}{at}",
            "protocol mqtt",
            f"cafile {directory / cafile}",
            f"crlfile {directory / crlfile}",
            f"certfile {directory / SERVER_CERT}",
            f"keyfile {directory / SERVER_KEY}",
            "tls_version tlsv1.2",
            "require_certificate true",
            "use_identity_as_username true",
        ]

    return (
        "\n".join(
            [
                "# mosquitto for an edgepack fleet, written by 'edgepack fleet broker-config mosquitto'.",
                "# Only clients with a certificate from the fleet's CAs connect; the certificate's CN is the user name",
                f"# that {directory / ACL} grants topics to. Add persistence settings for production (docs/broker-acl.md).",
                "per_listener_settings false",
                "allow_anonymous false",
                f"acl_file {directory / ACL}",
                "",
                "# devices: certificates of the fleet CA; the client id is replaced by the CN, so no device can use",
                "# another's client id to knock it off the broker",
                *listener(port, CA_CERT, CRL),
                "use_username_as_clientid true",
                "",
                "# operators: certificates of the operator CA only (a device certificate fails the TLS handshake here);",
                "# client ids are kept, so one operator runs several tools at once",
                *listener(operator_port, OPERATOR_CA_CERT, OPERATOR_CRL),
            ]
        )
        + "\n"
    )


def write_mosquitto(
    ca: FleetCA,
    out: Path,
    *,
    hosts: Sequence[str],
    port: int = DEFAULT_PORT,
    operator_port: int = DEFAULT_OPERATOR_PORT,
    bind: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    install_dir: Path | None = None,
    operator_forget: bool = False,
) -> BrokerFiles:
    """Write mosquitto.conf, the ACL, the broker certificate and the CA certificate into ``out``.

    ``install_dir`` is where the files will be on the broker host (default: ``out`` itself, absolute).
    """
    if not hosts:
        raise FleetIdentityError("give the broker's host names or addresses (--host), which devices connect to")
    for number in (port, operator_port):
        if not 0 < number < 65536:
            raise FleetIdentityError(f"port {number} is not a TCP port (1-65535)")
    if port == operator_port:
        raise FleetIdentityError(
            f"devices and operators need two listeners; --port and --operator-port are both {port}"
        )
    topics = Topics(prefix)
    devices = list(ca.current("device"))
    operators = list(ca.current("operator"))
    if not operators:
        raise FleetIdentityError(
            f"the fleet CA in {ca.directory} has issued no operator certificate, so nobody could send commands: "
            f"run 'edgepack fleet provision-operator NAME --ca {ca.directory} -o DIR' first"
        )
    ensure_dir(out)
    reused = _server_certificate(ca, out, hosts)
    atomic_write_bytes(out / CA_CERT, ca.cert_pem)
    atomic_write_bytes(out / OPERATOR_CA_CERT, ca.operators_cert_pem)
    atomic_write_bytes(out / CRL, ca.crl_pem())
    atomic_write_bytes(out / OPERATOR_CRL, ca.crl_pem(operator=True))
    acl = render_acl(topics, devices, operators, operator_forget=operator_forget)
    atomic_write_bytes(out / ACL, acl.encode())
    conf = render_conf(install_dir or out.resolve(), port=port, operator_port=operator_port, bind=bind)
    atomic_write_bytes(out / CONF, conf.encode())
    return BrokerFiles(
        conf=out / CONF, acl=out / ACL, cert=out / SERVER_CERT, key=out / SERVER_KEY, ca=out / CA_CERT,
        devices=[d.cn for d in devices], operators=[o.cn for o in operators], reused_cert=reused,
    )  # fmt: skip


def _server_certificate(ca: FleetCA, out: Path, hosts: Sequence[str]) -> bool:
    """Keep ``out``'s broker certificate when this CA issued it, it names every host and has a month left;
    else issue a new one. Returns whether it was kept."""
    cert_path, key_path = out / SERVER_CERT, out / SERVER_KEY
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            ca.verify(cert)
            names = _names(cert)
            left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            same_key = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ) == cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if same_key and {_normal(h) for h in hosts} <= names and left > datetime.timedelta(days=30):
                return True
            log.info("the broker certificate in %s does not cover %s or expires soon: issuing a new one", out, hosts)
        except (ValueError, TypeError, FleetIdentityError) as exc:
            log.warning("the broker certificate in %s is unusable (%s): issuing a new one", out, exc)
    leaf = ca.issue(hosts[0], "broker", hosts=hosts)
    atomic_write_bytes(key_path, leaf.key_pem, mode=0o600)
    atomic_write_bytes(cert_path, leaf.cert_pem)
    return False


def _normal(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = set(san.get_values_for_type(x509.DNSName))
    names |= {str(ipaddress.ip_address(ip)) for ip in san.get_values_for_type(x509.IPAddress)}
    return names
