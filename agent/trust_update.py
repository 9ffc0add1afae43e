"""Applying a new trust root on the device: from a file (``edgepack agent trust-update``) or a ``trust`` message.

Both paths end in :meth:`TrustStore.update <edgepack.trust.TrustStore.update>`, which holds every rule
(rotation by exactly N+1, signed by N's and its own root keys; revocations only grow; the newest root
must not be expired) and writes atomically. This module only reads the two delivery formats:

- a TUF root document as ``edgepack trust rotate`` writes it (``roots/N.root.json``), or
- a ``trust`` message (:class:`edgepack.protocol.TrustUpdate`): several versions, oldest first — what
  ``edgepack fleet trust push`` publishes and what a device that missed versions walks in order.

With a daemon running, ``edgepack agent trust-update`` hands the document to it over the control socket
(``agent/control.py``), so the one process that verifies bundles and commands swaps its root in memory
at the same moment the file changes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edgepack.errors import TrustUpdateError
from edgepack.protocol import MAX_TRUST_BYTES, parse_trust_update
from edgepack.trust import TrustStore

log = logging.getLogger(__name__)


def roots_from_document(data: bytes) -> list[dict[str, Any]]:
    """The root versions in a trust-update file or message: one TUF root, or a ``trust`` message."""
    if len(data) > MAX_TRUST_BYTES:
        raise TrustUpdateError(f"trust update is {len(data)} bytes, more than the {MAX_TRUST_BYTES} allowed")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise TrustUpdateError(f"trust update is not JSON: {exc}") from exc
    if isinstance(raw, dict) and "signed" in raw and "signatures" in raw:
        return [raw]
    if isinstance(raw, dict) and raw.get("kind") == "trust":
        return parse_trust_update(data).roots
    raise TrustUpdateError(
        "a trust update is a TUF root document (roots/N.root.json from 'edgepack trust rotate') or a 'trust' "
        'message ({"v": 1, "kind": "trust", "roots": [...]})'
    )


def read_document(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TrustUpdateError(f"cannot read trust update {path}: {exc.strerror or exc}") from exc


def apply_document(trust: TrustStore, data: bytes) -> dict[str, Any]:
    """Apply the roots in ``data`` to ``trust``; what changed, for the CLI, the control socket and the log."""
    before = trust.version
    applied = trust.update(roots_from_document(data))
    if applied:
        log.info("trust root updated from version %d to %d", before, trust.version)
    return {"previous_version": before, "applied": applied, **trust.describe()}
