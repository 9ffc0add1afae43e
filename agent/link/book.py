"""The command book: which commands this device accepted, the replay rules, and the pending queue on disk.

Kept in ``STATE/commands.json`` (written atomically: temp file, fsync, rename, directory fsync). Rules:

- a command id is accepted once; its ``seq`` must exceed the last accepted for its model;
- a retained command the device has already accepted comes back on every (re)subscribe: it is ignored
  quietly; the same command sent live is a replay and is reported;
- a command past its ``expires_at`` is refused;
- a newer command for a model supersedes that model's pending installs (an install: ``superseded``; a
  rollback: ``canceled``, see :meth:`CommandBook.accept`);
- a finished command keeps its ``result`` event until the broker acknowledged it (:meth:`CommandBook.reported`):
  an agent killed between finishing a job and that acknowledgement sends the result again at its next start
  (the operator takes results idempotently, by command id), so a committed install is never reported lost.

**A corrupt book must not take the device down.** If ``commands.json`` cannot be read, it is kept as
``commands.json.corrupt-<UTC time>``, the book starts empty, and — since the sequence numbers it knew are
lost — it refuses conservatively what it can no longer tell apart from a replay: a command issued before
the newest install or rollback the store's journal records for its model (the journal keeps names and
times, not sequence numbers; ``issued_at`` is signed, so this works whatever sequence scheme the operator
uses). Those floors are saved with the new book; a notice says what happened (device state and log).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgepack.errors import ReplayedCommandError, StaleCommandError
from edgepack.fsutil import atomic_write_json, read_json
from edgepack.manifest import utc_now
from edgepack.protocol import InstallCommand, SignedCommand

log = logging.getLogger(__name__)

COMMANDS_FILE = "commands.json"
DONE_KEPT = 256


class _Done(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    outcome: str
    result: dict[str, Any] | None = None  # the result event, until the broker acknowledged it


class _BookFile(BaseModel):
    """The schema of ``commands.json`` (anything else is corrupt)."""

    model_config = ConfigDict(extra="ignore")
    version: int = 1
    last_seq: dict[str, int] = Field(default_factory=dict)
    done: list[_Done] = Field(default_factory=list)
    pending: list[SignedCommand] = Field(default_factory=list)
    issued_floor: dict[str, datetime] = Field(default_factory=dict)


class CommandBook:
    """Accepted commands, persisted in ``path``: the replay rules and the pending queue.

    Invariants: an id is accepted at most once; ``last_seq[model]`` only grows; a command is written to
    ``pending`` (atomically, with ``last_seq``) before any of its work starts, and leaves it when it ends.

    ``journals`` gives (model name, time of a journal entry) pairs; it is called only when the file is corrupt.
    """

    def __init__(self, path: Path, *, journals: Callable[[], Iterable[tuple[str, datetime]]] | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.notices: list[str] = []
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):  # an atomic write cut short by a crash
            leftover.unlink(missing_ok=True)
        book = _BookFile()
        if path.exists():
            try:
                book = _BookFile.model_validate(read_json(path))
            except (ValueError, TypeError, OSError) as exc:  # pydantic's ValidationError is a ValueError
                book = self._quarantine(exc, journals or (lambda: ()))
        self._pending: list[SignedCommand] = list(book.pending)
        self._last_seq: dict[str, int] = dict(book.last_seq)
        self._done: list[dict[str, Any]] = [d.model_dump(exclude_none=True) for d in book.done]
        self._floor: dict[str, datetime] = dict(book.issued_floor)
        if self.notices:
            self._save()

    # --- the rules -------------------------------------------------------------------------------

    def check(self, signed: SignedCommand, *, retained: bool) -> bool:
        """True when the command is new; False to ignore it quietly; raises when it must be refused."""
        command = signed.command
        with self._lock:
            if any(p.command.id == command.id for p in self._pending):
                return False  # already accepted and running: a redelivery, not a new command
            done = next((d for d in self._done if d["id"] == command.id), None)
            if done is not None:
                if retained:
                    return False
                raise ReplayedCommandError(
                    f"replayed command {command.id}: it was already accepted ({done['outcome']}) and is not run twice"
                )
            last = self._last_seq.get(command.model, 0)
            if command.seq <= last:
                raise StaleCommandError(
                    f"command {command.id} for {command.model} has sequence {command.seq}, not newer than "
                    f"{last} already accepted (an older or replayed command; check the operator's clock)"
                )
            floor = self._floor.get(command.model)
            if floor is not None and command.issued_at <= floor:
                if retained:
                    log.info("ignoring retained command %s: issued before the book was rebuilt", command.id)
                    return False
                raise StaleCommandError(
                    f"command {command.id} for {command.model} was issued at {command.issued_at.isoformat()}, "
                    f"before this device's last change of {command.model} ({floor.isoformat()}); its command book "
                    "was rebuilt after corruption, so older commands are refused — send a new one"
                )
        if expired(signed):
            raise StaleCommandError(f"command {command.id} expired at {command.expires_at.isoformat()}")  # type: ignore[union-attr]
        return True

    def accept(self, signed: SignedCommand) -> list[SignedCommand]:
        """Record ``signed`` as pending; returns the pending installs of the same model it supersedes.

        A newer install supersedes them; so does a rollback (it means "go back", not "after that install").
        """
        command = signed.command
        with self._lock:
            superseded = [
                p for p in self._pending if isinstance(p.command, InstallCommand) and p.command.model == command.model
            ]
            self._pending = [p for p in self._pending if p not in superseded] + [signed]
            self._last_seq[command.model] = max(command.seq, self._last_seq.get(command.model, 0))
            for old in superseded:
                self._remember(old.command.id, "superseded")
            self._save()
        return superseded

    def finish(self, command_id: str, outcome: str, result: dict[str, Any] | None = None) -> None:
        """End ``command_id`` with ``outcome``; ``result`` (its result event) is kept until :meth:`reported`."""
        with self._lock:
            self._pending = [p for p in self._pending if p.command.id != command_id]
            self._remember(command_id, outcome, result)
            self._save()

    def reported(self, command_ids: Iterable[str]) -> None:
        """The broker acknowledged the result events of ``command_ids``: they need not be sent again."""
        ids = set(command_ids)
        if not ids:
            return
        with self._lock:
            changed = False
            for done in self._done:
                if done["id"] in ids and done.get("result") is not None:
                    done.pop("result")
                    changed = True
            if changed:
                self._save()

    def unreported(self) -> list[dict[str, Any]]:
        """The result events that no broker acknowledged (the agent stopped or lost power first)."""
        with self._lock:
            return [dict(d["result"]) for d in self._done if d.get("result") is not None]

    def pending(self) -> list[SignedCommand]:
        with self._lock:
            return list(self._pending)

    # --- internals -------------------------------------------------------------------------------

    def _quarantine(self, exc: BaseException, journals: Callable[[], Iterable[tuple[str, datetime]]]) -> _BookFile:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        kept = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            self.path.replace(kept)
            where = f"kept as {kept.name}"
        except OSError as move_error:
            where = f"could not be moved aside ({move_error.strerror})"
        floors: dict[str, datetime] = {}
        try:
            for name, at in journals():
                floors[name] = max(at, floors.get(name, at))
        except Exception as journal_error:  # the journal may be damaged too: then there is nothing to rebuild from
            log.error("cannot read the journal to rebuild the command book: %s", journal_error)
        notice = f"{self.path.name} was corrupt ({_short(exc)}); {where}; started an empty command book" + (
            f" refusing commands issued before the last change of {', '.join(sorted(floors))}"
            if floors
            else " (no journal to rebuild sequence floors from)"
        )
        log.error("%s", notice)
        self.notices.append(notice)
        return _BookFile(issued_floor=floors)

    def _remember(self, command_id: str, outcome: str, result: dict[str, Any] | None = None) -> None:
        self._done = [d for d in self._done if d["id"] != command_id][-(DONE_KEPT - 1) :]
        entry: dict[str, Any] = {"id": command_id, "outcome": outcome}
        if result is not None:
            entry["result"] = result
        self._done.append(entry)

    def _save(self) -> None:
        data: dict[str, Any] = {
            "version": 1,
            "last_seq": self._last_seq,
            "done": self._done,
            "pending": [p.model_dump(mode="json") for p in self._pending],
        }
        if self._floor:
            data["issued_floor"] = {k: v.isoformat() for k, v in self._floor.items()}
        atomic_write_json(self.path, data)


def expired(signed: SignedCommand, now: datetime | None = None) -> bool:
    """Whether ``signed`` is past its ``expires_at``."""
    expires = signed.command.expires_at
    return expires is not None and expires <= (now or utc_now())


def journal_times(store: Any) -> list[tuple[str, datetime]]:
    """(model name, time of the newest entry) of every journal of a :class:`~edgepack.agent.store.DeviceStore`."""
    times = []
    for journal in store.journals():
        history = journal.data.get("history") or []
        stamps = [datetime.fromisoformat(str(h["at"]).replace("Z", "+00:00")) for h in history if "at" in h]
        if stamps and journal.data.get("name"):
            times.append((str(journal.data["name"]), max(stamps)))
    return times


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
