"""The signed commands a rollout sends, made in one place.

Every command's id, ``seq`` and times come from :func:`command_fields` alone, so a change to how the
operator orders commands (a persisted counter instead of the issue time) is made here once.
"""

from __future__ import annotations

from datetime import timedelta

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


def install(
    chunked: ChunkedBundle, device: str, keys: list[SigningKey], ttl: timedelta, seq: int | None = None
) -> SignedCommand:
    manifest = chunked.manifest
    command = InstallCommand(
        **command_fields(device, ttl, seq),  # type: ignore[arg-type]
        action="install",
        model=manifest.name,
        version=manifest.version,
        target=manifest.target,
        bundle=chunked.bundle,
        size=chunked.index.size,
        sha256=chunked.index.sha256,
        index_sha256=chunked.index_sha256,
    )
    return sign_command(command, keys)


def rollback(model: str, device: str, keys: list[SigningKey], ttl: timedelta, seq: int | None = None) -> SignedCommand:
    command = RollbackCommand(**command_fields(device, ttl, seq), action="rollback", model=model)  # type: ignore[arg-type]
    return sign_command(command, keys)
