"""Provisioning: give a device (or an operator) its broker identity — a key and a certificate from the fleet CA.

A device's files land in the layout the firmware build takes as its ``identity/`` context
(``scripts/build-image --device-cert/--device-key/--ca``, ``firmware-images/common/install-agent.sh``) and the
paths the shipped ``agent.toml`` ``[broker]`` section already names::

    OUT/device.pem   → /etc/edgepack/device.pem   the certificate, CN = the device id
    OUT/device.key   → /etc/edgepack/device.key   its key (0600 here; the image installs it 0640 root:edgepack)
    OUT/ca.pem       → /etc/edgepack/ca.pem       the fleet CA, which the broker's certificate chains to

An operator gets ``operator.pem``, ``operator.key`` and ``ca.pem`` (for ``deploy``/``fleet``: ``--ca``, ``--cert``,
``--tls-key``).

The device's **groups** are fixed here, from its labels (the same rule as the agent,
:func:`edgepack.protocol.groups_from_labels`), and recorded with the certificate: the broker ACL lets a device
read only the command topics of the groups it was provisioned in. Give the device the same labels in its
``agent.toml``; provisioning again with other labels issues a new certificate and moves the device.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from edgepack.errors import FleetIdentityError
from edgepack.fleet.ca import CA_CERT, LEAF_DAYS, FleetCA, LeafCertificate
from edgepack.fsutil import atomic_write_bytes, ensure_dir
from edgepack.protocol import NAME_RE, groups_from_labels

log = logging.getLogger(__name__)

DEVICE_CERT, DEVICE_KEY = "device.pem", "device.key"
OPERATOR_CERT, OPERATOR_KEY = "operator.pem", "operator.key"
# the agent's device_id rule (agent/config.py DEVICE_ID_PATTERN): a topic name without the '=' and ':' of groups
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Provisioned:
    """What provisioning wrote: the identity, its groups, and the files."""

    cn: str
    kind: str
    groups: list[str]
    cert: Path
    key: Path
    ca: Path
    serial: int


def provision_device(
    ca: FleetCA, device_id: str, out: Path, *, labels: dict[str, str] | None = None, days: int = LEAF_DAYS,
    force: bool = False,
) -> Provisioned:  # fmt: skip
    """Issue ``device_id``'s key and certificate and write them (with the CA certificate) into ``out``."""
    if not _DEVICE_ID.match(device_id):
        raise FleetIdentityError(
            f"{device_id!r} cannot be a device id: 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (the agent's device_id rule)"
        )
    labels = dict(labels or {})
    groups = groups_from_labels(labels)
    unusable = sorted({f"{k}={v}" for k, v in labels.items()} - set(groups))
    if unusable:  # the agent skips them the same way (a comma-separated 'group' label still gives its groups)
        log.warning("labels %s of %s cannot name a group topic; no group for them", unusable, device_id)
    _check_free(out / DEVICE_KEY, force)
    leaf = ca.issue(device_id, "device", days=days, labels=labels, groups=groups)
    return _write(ca, leaf, out, DEVICE_CERT, DEVICE_KEY, cn=device_id, kind="device", groups=groups)


def provision_operator(ca: FleetCA, name: str, out: Path, *, days: int = LEAF_DAYS, force: bool = False) -> Provisioned:
    """Issue an operator's key and certificate (CN = ``name``) and write them with the CA certificate into ``out``."""
    if not NAME_RE.match(name):
        raise FleetIdentityError(
            f"{name!r} cannot be an operator name: 1-128 letters, digits or '._=:-', starting with a letter or digit"
        )
    _check_free(out / OPERATOR_KEY, force)
    leaf = ca.issue(name, "operator", days=days)
    return _write(ca, leaf, out, OPERATOR_CERT, OPERATOR_KEY, cn=name, kind="operator", groups=[])


def _check_free(key_path: Path, force: bool) -> None:
    if key_path.exists() and not force:
        raise FleetIdentityError(
            f"{key_path} already holds an identity; provisioning again would replace it — choose another -o or "
            "pass --force"
        )


def _write(
    ca: FleetCA, leaf: LeafCertificate, out: Path, cert_name: str, key_name: str, *, cn: str, kind: str,
    groups: list[str],
) -> Provisioned:  # fmt: skip
    key_path = out / key_name
    ensure_dir(out)
    atomic_write_bytes(key_path, leaf.key_pem, mode=0o600)
    atomic_write_bytes(out / cert_name, leaf.cert_pem)
    atomic_write_bytes(out / CA_CERT, ca.cert_pem)
    log.info("issued %s certificate %x for %s (groups %s) into %s", kind, leaf.cert.serial_number, cn, groups, out)
    return Provisioned(
        cn=cn, kind=kind, groups=groups, cert=out / cert_name, key=key_path, ca=out / CA_CERT,
        serial=leaf.cert.serial_number,
    )  # fmt: skip
