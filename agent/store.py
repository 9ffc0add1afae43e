"""The device store: verified bundles by hash, active/previous per model name, anti-rollback marks, journal.

Layout of the state directory (``/var/lib/edgepack`` by default)::

    state.json                 {"version": 1, "models": {NAME: {"active", "previous", "highest_version"}}}
    bundles/HASH/              a verified, extracted bundle: manifest.json, signatures.json, payload files
    journal/SEQ-NAME.json      one install transaction each: its current state, history and outcome
    incoming/                  partial transfers (MQTT delivery)
    tmp/                       scratch space on the same file system (extraction staging)

HASH is the sha256 of the bundle's canonical manifest bytes: the manifest pins every payload file, so it
names the whole bundle. Invariants:

- ``state.json`` changes only through :meth:`DeviceStore.commit_state` (temporary file, fsync, rename,
  directory fsync): after a power cut it is the old or the new state, never a mix.
- A ``bundles/HASH`` directory exists only complete and verified (``extract_bundle`` renames a staged
  directory into place); the store never points at a bundle that is not on disk.
- ``highest_version`` per model name never decreases.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack.bundle import MANIFEST_NAME, SIGNATURES_NAME
from edgepack.errors import InstallError
from edgepack.fsutil import atomic_write_json, file_digest, read_json
from edgepack.manifest import Manifest, parse_manifest
from edgepack.trust import TrustStore, decode_signatures

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


@dataclass
class ModelState:
    """What the device runs for one model name."""

    active: str | None = None
    previous: str | None = None
    highest_version: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"active": self.active, "previous": self.previous, "highest_version": self.highest_version}


@dataclass
class StoreState:
    models: dict[str, ModelState] = field(default_factory=dict)

    def model(self, name: str) -> ModelState:
        return self.models.setdefault(name, ModelState())

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "models": {n: m.to_json() for n, m in sorted(self.models.items())}}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StoreState:
        return cls({name: ModelState(**entry) for name, entry in raw.get("models", {}).items()})


def bundle_hash(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()


class DeviceStore:
    """The state directory of one device."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("bundles", "journal", "incoming", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._seq = itertools.count(self._last_journal_seq() + 1)

    # --- state -----------------------------------------------------------------------------------

    def load_state(self) -> StoreState:
        path = self.root / STATE_FILE
        if not path.exists():
            return StoreState()
        try:
            return StoreState.from_json(read_json(path))
        except (ValueError, TypeError) as exc:
            raise InstallError(f"{path} is corrupt ({exc}); restore it or remove it to start empty") from exc

    def commit_state(self, state: StoreState) -> None:
        """Persist ``state`` atomically; the one place state.json is written."""
        atomic_write_json(self.root / STATE_FILE, state.to_json())

    # --- bundles ---------------------------------------------------------------------------------

    def bundle_dir(self, digest: str) -> Path:
        return self.root / "bundles" / digest

    def has_bundle(self, digest: str) -> bool:
        return (self.bundle_dir(digest) / MANIFEST_NAME).is_file()

    def manifest(self, digest: str) -> Manifest:
        return parse_manifest((self.bundle_dir(digest) / MANIFEST_NAME).read_bytes())

    def reverify(self, digest: str, trust: TrustStore) -> Manifest:
        """Check a stored bundle again (signatures and payload hashes) before loading it at boot."""
        directory = self.bundle_dir(digest)
        manifest_bytes = (directory / MANIFEST_NAME).read_bytes()
        if bundle_hash(manifest_bytes) != digest:
            raise InstallError(f"stored bundle {digest[:12]}… does not match its name: the store was altered")
        manifest = parse_manifest(manifest_bytes)
        trust.verify(
            "manifest", manifest_bytes, decode_signatures((directory / SIGNATURES_NAME).read_bytes()), "bundle"
        )
        for pinned in manifest.files:
            if file_digest(directory / pinned.path) != (pinned.size, pinned.sha256):
                raise InstallError(
                    f"stored bundle {manifest.name} {manifest.version}: {pinned.path} was altered on disk"
                )
        return manifest

    def remove_unreferenced(self, state: StoreState) -> list[str]:
        """Delete stored bundles that no model references (after a commit or a recovery)."""
        referenced = {d for m in state.models.values() for d in (m.active, m.previous) if d}
        removed = []
        for directory in (self.root / "bundles").iterdir():
            if directory.name not in referenced:
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory.name)
        for leftover in (self.root / "tmp").iterdir():
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        return removed

    # --- journal ---------------------------------------------------------------------------------

    def new_journal(self, name: str, digest: str, version: str, action: str) -> Journal:
        journal = Journal(self.root / "journal" / f"{next(self._seq):08d}-{name}.json")
        journal.data = {
            "name": name,
            "bundle": digest,
            "version": version,
            "action": action,
            "state": "start",
            "history": [],
            "outcome": None,
            "reason": None,
        }
        journal.advance("start")
        return journal

    def journals(self) -> list[Journal]:
        return [Journal.load(p) for p in sorted((self.root / "journal").glob("*.json"))]

    def _last_journal_seq(self) -> int:
        numbers = [int(p.name.split("-", 1)[0]) for p in (self.root / "journal").glob("*.json")]
        return max(numbers, default=0)


class Journal:
    """One install transaction's record, rewritten atomically at every state change."""

    TERMINAL = ("committed", "rolled_back", "failed")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    @classmethod
    def load(cls, path: Path) -> Journal:
        journal = cls(path)
        journal.data = read_json(path)
        return journal

    @property
    def state(self) -> str:
        return str(self.data["state"])

    @property
    def finished(self) -> bool:
        return self.state in self.TERMINAL

    def advance(self, state: str, reason: str | None = None) -> None:
        self.data["state"] = state
        self.data["history"].append(
            {"state": state, "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
        )
        if state in self.TERMINAL:
            self.data["outcome"] = state
            self.data["reason"] = reason
        atomic_write_json(self.path, self.data)
