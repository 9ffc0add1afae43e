"""The device store: verified bundles by hash, active/previous per model name, anti-rollback marks, journal.

Layout of the state directory (``/var/lib/edgepack`` by default)::

    state.json                 {"version": 1, "models": {NAME: {"active", "previous", "highest_version"}}}
    state.json.corrupt-STAMP   a state.json that did not parse, kept for inspection (see below)
    bundles/HASH/              a verified, extracted bundle: manifest.json, signatures.json, payload files
    journal/SEQ-NAME.json      one install transaction each: its current state, history and outcome
    incoming/                  partial transfers (MQTT delivery)
    tmp/                       scratch space on the same file system (bundles being deleted)

HASH is the sha256 of the bundle's canonical manifest bytes: the manifest pins every payload file, so it
names the whole bundle. Invariants:

- ``state.json`` changes only through :meth:`DeviceStore.commit_state` (temporary file, fsync, rename,
  directory fsync): after a power cut it is the old or the new state, never a mix.
- A ``bundles/HASH`` directory exists only complete and verified (``extract_bundle`` renames a staged,
  synced directory into place); a bundle is deleted by renaming it out of ``bundles/`` first, so a power
  cut never leaves half a bundle under its name.
- ``highest_version`` per model name never decreases.
- A committed journal records the model's committed state (``committed_state``); the newest committed
  journal of each model name is never pruned, so the state can be rebuilt from the journals.

A ``state.json`` (or journal file) that does not parse or has the wrong shape does not take the device
down: it is renamed to ``NAME.corrupt-STAMP``, the state is rebuilt from the journals' committed outcomes
and the bundles on disk, and a line is added to :attr:`DeviceStore.notices` (shown by ``agent status``
and in the device's state). The agent then serves what verifies, as at any boot.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import semver
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, field_validator

from edgepack.bundle import MANIFEST_NAME, SIGNATURES_NAME
from edgepack.errors import EdgepackError, InstallError
from edgepack.fsutil import atomic_write_json, ensure_dir, file_digest, fsync_dir, loads_json, read_json
from edgepack.manifest import Manifest, parse_manifest, validation_summary
from edgepack.trust import TrustStore, decode_signatures

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1
JOURNAL_KEEP = 50  # finished journals kept (plus the newest committed one of each model name)
CORRUPT_MARK = ".corrupt-"
MAX_NOTICES = 20

_Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
_Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


class _ModelEntryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    active: _Digest | None = None
    previous: _Digest | None = None
    highest_version: str | None = None

    @field_validator("highest_version")
    @classmethod
    def _semver(cls, value: str | None) -> str | None:
        if value is not None and not semver.Version.is_valid(value):
            raise ValueError(f"{value!r} is not a semantic version")
        return value


class _StateFile(BaseModel):
    """The schema of ``state.json``; what does not match it is a corrupt state file."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    models: dict[_Name, _ModelEntryFile]


class _JournalFile(BaseModel):
    """The fields of a journal file the store relies on (more may be present)."""

    model_config = ConfigDict(extra="allow")

    name: _Name
    bundle: _Digest
    version: str
    action: Literal["install", "rollback"]
    state: str
    history: list[dict[str, Any]]
    outcome: Literal["committed", "rolled_back", "failed"] | None = None
    reason: str | None = None


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
        return {"version": STATE_VERSION, "models": {n: m.to_json() for n, m in sorted(self.models.items())}}

    @classmethod
    def from_json(cls, raw: Any) -> StoreState:
        """Validate and build; raises ValueError (pydantic's ValidationError is one) on any other shape."""
        parsed = _StateFile.model_validate(raw)
        return cls({name: ModelState(**entry.model_dump()) for name, entry in parsed.models.items()})


def bundle_hash(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def _why(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return f"wrong shape: {validation_summary(exc)}"
    return str(exc) or type(exc).__name__


class DeviceStore:
    """The state directory of one device."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.notices: list[str] = []  # what the store repaired on its own, for `agent status` and the link
        for sub in ("bundles", "journal", "incoming", "tmp"):
            ensure_dir(self.root / sub)
        self._seq = itertools.count(self._last_journal_seq() + 1)
        self._repair_lock = threading.RLock()
        self._held: StoreState | None = None  # a rebuilt state that could not be written to disk
        self._held_for: bytes | None = None  # the corrupt bytes it replaces, while they could not be moved

    # --- state -----------------------------------------------------------------------------------

    def load_state(self) -> StoreState:
        """The committed state; a corrupt ``state.json`` is quarantined and rebuilt (see the module docs)."""
        path = self.root / STATE_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            with self._repair_lock:
                return copy.deepcopy(self._held) if self._held is not None else StoreState()
        except OSError as exc:
            return self._repair_state(None, exc)
        try:
            return StoreState.from_json(loads_json(data))
        except ValueError as exc:
            return self._repair_state(data, exc)

    def commit_state(self, state: StoreState) -> None:
        """Persist ``state`` atomically; the one place state.json is written."""
        atomic_write_json(self.root / STATE_FILE, state.to_json())
        with self._repair_lock:
            self._held = self._held_for = None

    def notice(self, message: str) -> None:
        """Record something the store repaired on its own (kept in memory, newest last, bounded)."""
        log.error("%s", message)
        self.notices.append(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {message}")
        del self.notices[:-MAX_NOTICES]

    def _repair_state(self, data: bytes | None, exc: BaseException) -> StoreState:
        path = self.root / STATE_FILE
        with self._repair_lock:
            if self._held is not None and data is not None and data == self._held_for:
                return copy.deepcopy(self._held)  # the same corrupt file, already handled
            kept = self._quarantine(path)
            state = self.rebuild_state()
            summary = "; ".join(
                f"{name} active {self._version_of(m.active)}, highest {m.highest_version}"
                for name, m in sorted(state.models.items())
            ) or "no model"
            message = (
                f"{path} was unreadable or corrupt ({_why(exc)}); "
                + (f"kept as {kept.name}; " if kept else "it could not be moved aside; ")
                + f"rebuilt from the journals and the bundles on disk: {summary}"
            )
            try:
                self.commit_state(state)
            except OSError as write_exc:
                self._held, self._held_for = state, data
                message += f"; the rebuilt state could not be written ({write_exc}) and is held in memory"
            self.notice(message)
            return copy.deepcopy(state)

    def _quarantine(self, path: Path) -> Path | None:
        """Rename a corrupt file to ``NAME.corrupt-STAMP`` beside it; None when it cannot be moved."""
        target = path.with_name(f"{path.name}{CORRUPT_MARK}{_stamp()}")
        try:
            os.replace(path, target)
            fsync_dir(path.parent)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot move the corrupt %s aside: %s", path, exc)
            return None
        return target

    def rebuild_state(self) -> StoreState:
        """The state as far as the store can tell without ``state.json``.

        The newest committed journal of each model name gives its active and previous bundle (from its
        ``committed_state``, or by replaying older journals that lack it); the highest version is the
        largest of the committed versions and the bundles on disk. Only bundles present on disk (name
        matching their manifest's hash) are referenced; a model whose journals are gone gets its newest
        bundle on disk as active and the next as previous. Signatures are checked again when loading.
        """
        present = self._bundles_on_disk()
        models: dict[str, ModelState] = {}
        marks: dict[str, semver.Version] = {}

        def raise_mark(name: str, version: str | None) -> None:
            if version and semver.Version.is_valid(version):
                parsed = semver.Version.parse(version)
                if name not in marks or parsed > marks[name]:
                    marks[name] = parsed

        for journal in self.journals():
            if journal.data.get("outcome") != "committed":
                continue
            name, digest = journal.data["name"], journal.data["bundle"]
            recorded = journal.data.get("committed_state")
            entry = models.setdefault(name, ModelState())
            try:
                parsed = _ModelEntryFile.model_validate(recorded) if recorded is not None else None
            except ValidationError:
                parsed = None
            if parsed is not None:
                entry.active, entry.previous = parsed.active, parsed.previous
                raise_mark(name, parsed.highest_version)
            elif journal.data["action"] == "rollback":
                entry.previous, entry.active = None, digest
            else:
                if entry.active != digest:
                    entry.previous = entry.active
                entry.active = digest
            raise_mark(name, journal.data["version"])
        by_name: dict[str, list[tuple[semver.Version, str]]] = {}
        for digest, manifest in present.items():
            by_name.setdefault(manifest.name, []).append((manifest.semver, digest))
            raise_mark(manifest.name, manifest.version)
        for entry in models.values():
            entry.active = entry.active if entry.active in present else None
            entry.previous = entry.previous if entry.previous in present else None
            if entry.active is None:
                entry.active, entry.previous = entry.previous, None
        for name, found in by_name.items():
            entry = models.setdefault(name, ModelState())
            if entry.active is None:
                newest = [d for _, d in sorted(found, reverse=True)]
                entry.active, entry.previous = newest[0], (newest[1] if len(newest) > 1 else None)
        for name, mark in marks.items():
            models.setdefault(name, ModelState()).highest_version = str(mark)
        return StoreState(models)

    def _bundles_on_disk(self) -> dict[str, Manifest]:
        found = {}
        for directory in sorted((self.root / "bundles").iterdir()):
            if directory.name.startswith(".") or not directory.is_dir():
                continue
            try:
                data = (directory / MANIFEST_NAME).read_bytes()
                if bundle_hash(data) != directory.name:
                    continue
                found[directory.name] = parse_manifest(data)
            except (OSError, EdgepackError) as exc:
                log.warning("ignoring bundles/%s while rebuilding the state: %s", directory.name, exc)
        return found

    def _version_of(self, digest: str | None) -> str | None:
        if digest is None:
            return None
        try:
            return self.manifest(digest).version
        except (OSError, EdgepackError):
            return f"{digest[:12]}…"

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
        try:
            manifest_bytes = (directory / MANIFEST_NAME).read_bytes()
            if bundle_hash(manifest_bytes) != digest:
                raise InstallError(f"stored bundle {digest[:12]}… does not match its name: the store was altered")
            manifest = parse_manifest(manifest_bytes)
            trust.verify(  # installed: an expired trust root still serves what it holds
                "manifest", manifest_bytes, decode_signatures((directory / SIGNATURES_NAME).read_bytes()), "bundle",
                installed=True,
            )
            for pinned in manifest.files:
                if file_digest(directory / pinned.path) != (pinned.size, pinned.sha256):
                    raise InstallError(
                        f"stored bundle {manifest.name} {manifest.version}: {pinned.path} was altered on disk"
                    )
        except OSError as exc:
            raise InstallError(
                f"stored bundle {digest[:12]}… cannot be read ({exc.strerror or exc}): it is incomplete or the "
                "disk failed; install it again"
            ) from exc
        return manifest

    def remove_unreferenced(self, state: StoreState) -> list[str]:
        """Delete stored bundles that no model references, staging leftovers and scratch files.

        A bundle is first renamed out of ``bundles/`` (atomic), then deleted, so a power cut in the
        middle never leaves an incomplete directory under a bundle's name.
        """
        referenced = {d for m in state.models.values() for d in (m.active, m.previous) if d}
        removed = []
        bundles, scratch = self.root / "bundles", self.root / "tmp"
        for directory in bundles.iterdir():
            if directory.name in referenced:
                continue
            doomed = scratch / f"{directory.name.lstrip('.')}.{uuid.uuid4().hex[:8]}.deleting"
            try:
                os.replace(directory, doomed)
            except OSError:
                shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory.name)
        if removed:
            fsync_dir(bundles)
        for leftover in scratch.iterdir():
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        for partial in itertools.chain(self.root.glob(f".{STATE_FILE}.*.tmp"), (self.root / "journal").glob(".*.tmp")):
            partial.unlink(missing_ok=True)  # temporary files of writes a crash interrupted
        return removed

    def remove_interrupted_writes(self) -> list[str]:
        """Delete the temporary files of atomic writes a crash cut short in the state directory's top level
        (``.commands.json.*.tmp`` and the like). Only at boot, before anything else writes there: a live
        writer's temporary file must not vanish under it."""
        removed = []
        for partial in self.root.glob(".*.tmp"):
            partial.unlink(missing_ok=True)
            removed.append(partial.name)
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
        """Every journal, oldest first; a corrupt one is quarantined (with a notice) and left out."""
        found = []
        for path in sorted((self.root / "journal").glob("*.json")):
            try:
                found.append(Journal.load(path))
            except FileNotFoundError:
                continue  # pruned meanwhile
            except (OSError, ValueError) as exc:
                with self._repair_lock:
                    if not path.exists():
                        continue
                    kept = self._quarantine(path)
                    self.notice(
                        f"journal {path.name} was unreadable or corrupt ({_why(exc)}); "
                        + (f"kept as {kept.name}" if kept else "it could not be moved aside")
                        + "; the install it recorded is left out of the history"
                    )
        return found

    def prune_journals(self, keep: int | None = None) -> list[str]:
        """Keep the newest ``keep`` finished journals (default :data:`JOURNAL_KEEP`) and delete older ones;
        never an unfinished one, nor the newest committed journal of a model name (it records what a rebuild
        needs), which is kept in addition."""
        keep = JOURNAL_KEEP if keep is None else keep
        finished = [j for j in self.journals() if j.finished]
        protected = {j.data["name"]: j.path for j in finished if j.data.get("outcome") == "committed"}
        removed = []
        for journal in finished[: max(len(finished) - keep, 0)]:
            if journal.path in protected.values():
                continue
            journal.path.unlink(missing_ok=True)
            removed.append(journal.path.name)
        if removed:
            fsync_dir(self.root / "journal")
        return removed

    def _last_journal_seq(self) -> int:
        numbers = []
        for path in (self.root / "journal").iterdir():
            head = path.name.lstrip(".").split("-", 1)[0]
            if head.isdigit():
                numbers.append(int(head))
        return max(numbers, default=0)


class Journal:
    """One install transaction's record, rewritten atomically at every state change."""

    TERMINAL = ("committed", "rolled_back", "failed")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    @classmethod
    def load(cls, path: Path) -> Journal:
        """Read and check a journal file; ValueError when it is corrupt or has the wrong shape."""
        journal = cls(path)
        raw = read_json(path)
        _JournalFile.model_validate(raw)
        journal.data = raw
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
