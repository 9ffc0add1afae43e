"""X.509 helpers shared by the operator's fleet CA (``fleet/ca.py``) and the device (``agent/link``).

A device's name on a broker with the fleet's ACL is its client certificate's Common Name
(``docs/broker-acl.md``); both sides read it the same way, here.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID


def common_name(cert: x509.Certificate) -> str:
    """The certificate's subject CN ("" when it has none)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""
