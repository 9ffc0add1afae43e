"""The signed commands a rollout sends, made in one place.

Every command's id, ``seq`` and times come from :func:`command_fields` alone, so a change to how the
operator orders commands (a persisted counter instead of the issue time) is made here once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from edgepack.keys import SigningKey
from edgepack.protocol import (
    CommandTarget,
    InstallCommand,
    RollbackCommand,
    SignedCommand,
    new_command_fields,
    sign_command,
)
from edgepack.transfer import ChunkedBundle


def command_fields(device: str, ttl: timedelta, seq: int | None = None) -> dict[str, object]:
    """Fresh id, ``seq`` and times for a command to one device (the only place the fleet makes them).

    ``seq``: from the journal's counter (:meth:`Journal.next_command_seq`); None falls back to the clock.
    """
    return new_command_fields(CommandTarget(device=device), ttl=ttl, seq=seq)


def install_command(chunked: ChunkedBundle, fields: dict[str, Any]) -> InstallCommand:
    """The install command of ``chunked``: what it installs comes from the bundle and its index; ``fields``
    (id, ``seq``, times and recipient, from :func:`command_fields` or ``new_command_fields``) come on top
    and may override any of it (tests do)."""
    manifest = chunked.manifest
    pinned: dict[str, Any] = {
        "action": "install",
        "model": manifest.name,
        "version": manifest.version,
        "target": manifest.target,
        "bundle": chunked.bundle,
        "size": chunked.index.size,
        "sha256": chunked.index.sha256,
        "index_sha256": chunked.index_sha256,
    }
    return InstallCommand(**{**pinned, **fields})


def install(
    chunked: ChunkedBundle, device: str, keys: list[SigningKey], ttl: timedelta, seq: int | None = None
) -> SignedCommand:
    return sign_command(install_command(chunked, command_fields(device, ttl, seq)), keys)


def rollback(model: str, device: str, keys: list[SigningKey], ttl: timedelta, seq: int | None = None) -> SignedCommand:
    command = RollbackCommand(**command_fields(device, ttl, seq), action="rollback", model=model)  # type: ignore[arg-type]
    return sign_command(command, keys)
