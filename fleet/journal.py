"""The rollout journal: every rollout and every device's execution state, in SQLite, before it is acted on.

One file (stdlib ``sqlite3``, WAL, ``synchronous=FULL``) holds:

- ``rollouts``: the plan, the bundle, the status (``running``, ``paused``, ``aborting``, ``aborted``,
  ``canceled``, ``completed``), the current wave, and a ``request`` another process leaves
  (``edgepack fleet pause|resume|abort|cancel``) for the running operator to carry out;
- ``executions``: per device its state (``queued``, ``notified``, ``downloading``, ``installing``,
  ``soaking``, ``succeeded``, ``failed``, ``rejected``, ``timed_out``, ``canceled``, ``rolling_back``,
  ``rolled_back``), the device's code and reason, the attempt, and **the exact signed command** sent to it;
- ``history``: every transition, for ``status`` and for the audit.

A manual ``edgepack fleet rollback`` is journaled the same way: a ``rollouts`` row of ``kind`` ``rollback``
(no bundle; ``version`` is its ``--to``, or empty) and per device an execution that is ``rolling_back``
with its signed rollback command stored before it is published, then ``rolled_back``, ``failed``,
``timed_out``, or ``canceled`` with code ``skipped``/``refused`` and the reason.

The engine writes a transition (and the signed command it is about to publish) and commits *before* it
publishes anything, so an operator SIGKILLed at any instant finds on restart either a device not yet sent
anything (it is sent its command) or a device with a stored command (the same command, same id, is
published again; the device runs a command id once). Nothing is updated twice, nothing skipped.

Only one operator process may drive the rollouts of a journal: :meth:`Journal.lock` takes an exclusive
``flock`` on ``JOURNAL.lock`` (released by the kernel when the process dies, even by SIGKILL); the second
process gets :class:`~edgepack.errors.JournalLockedError` naming the first. Readers (``status``) need no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import FleetError, JournalLockedError

IN_FLIGHT = ("notified", "downloading", "installing")
TERMINAL = ("succeeded", "failed", "rejected", "timed_out", "canceled", "rolled_back")
STATES = ("queued", *IN_FLIGHT, "soaking", *TERMINAL[:5], "rolling_back", "rolled_back")
OPEN = ("running", "paused", "aborting")
CLOSED = ("completed", "aborted", "canceled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, created_at REAL NOT NULL, updated_at REAL NOT NULL, status TEXT NOT NULL,
    reason TEXT, request TEXT, selector TEXT NOT NULL, bundle_path TEXT NOT NULL, bundle TEXT NOT NULL,
    model TEXT NOT NULL, version TEXT NOT NULL, prefix TEXT NOT NULL, plan TEXT NOT NULL,
    wave INTEGER NOT NULL DEFAULT 0, published INTEGER NOT NULL DEFAULT 0, operator TEXT,
    kind TEXT NOT NULL DEFAULT 'rollout'
);
CREATE TABLE IF NOT EXISTS executions (
    rollout TEXT NOT NULL, device TEXT NOT NULL, joined INTEGER NOT NULL, wave INTEGER,
    state TEXT NOT NULL, code TEXT, reason TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    command_id TEXT, command TEXT, previous_version TEXT, notified_at REAL, committed_at REAL,
    rollback_id TEXT, rollback TEXT, updated_at REAL NOT NULL, target TEXT,
    PRIMARY KEY (rollout, device)
);
CREATE INDEX IF NOT EXISTS executions_command ON executions (command_id);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rollout TEXT NOT NULL, device TEXT, at REAL NOT NULL,
    state TEXT NOT NULL, code TEXT, reason TEXT, command_id TEXT
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def default_journal() -> Path:
    """``$EDGEPACK_FLEET_JOURNAL``, else ``$XDG_STATE_HOME/edgepack/fleet.sqlite`` (~/.local/state)."""
    env = os.environ.get("EDGEPACK_FLEET_JOURNAL")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "edgepack" / "fleet.sqlite"


@dataclass
class Execution:
    """One device in one rollout, as the journal holds it."""

    rollout: str
    device: str
    joined: int
    wave: int | None
    state: str
    code: str | None
    reason: str | None
    attempts: int
    command_id: str | None
    command: str | None
    previous_version: str | None
    notified_at: float | None
    committed_at: float | None
    rollback_id: str | None
    rollback: str | None
    updated_at: float
    target: str | None = None  # a manual rollback's version to go back to

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("command", "rollback")}


@dataclass
class Rollout:
    id: str
    created_at: float
    updated_at: float
    status: str
    reason: str | None
    request: str | None
    selector: str
    bundle_path: str
    bundle: str
    model: str
    version: str
    prefix: str
    plan: dict[str, Any]
    wave: int
    published: int
    operator: str | None
    kind: str = "rollout"  # or "rollback": an ``edgepack fleet rollback`` (fleet/rollback.py)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


class Journal:
    """The rollout journal file; one connection per instance, used by one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        columns = {row["name"] for row in self.db.execute("PRAGMA table_info(rollouts)")}
        if "kind" not in columns:  # a journal written before manual rollbacks were journaled
            self.db.execute("ALTER TABLE rollouts ADD COLUMN kind TEXT NOT NULL DEFAULT 'rollout'")
        if "target" not in {row["name"] for row in self.db.execute("PRAGMA table_info(executions)")}:
            self.db.execute("ALTER TABLE executions ADD COLUMN target TEXT")
        self._lock_file: Any = None

    def close(self) -> None:
        self.unlock()
        self.db.close()

    # --- the operator lock -----------------------------------------------------------------------

    def lock(self) -> None:
        """Become the one operator of this journal, or raise JournalLockedError naming the one that is."""
        handle = open(self.path.with_name(self.path.name + ".lock"), "a+")  # noqa: SIM115 - held until unlock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise JournalLockedError(
                f"rollout journal {self.path} is in use by operator {holder}; only one operator drives a "
                "journal's rollouts. Wait for it, or use 'edgepack fleet pause|abort|cancel ROLLOUT' from here "
                "(it carries them out), or give another --journal"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        self._lock_file = handle

    def locked_by_other(self) -> str | None:
        """Who holds the operator lock, or None when nobody (does not take it)."""
        if self._lock_file is not None:
            return None
        lock_path = self.path.with_name(self.path.name + ".lock")
        if not lock_path.exists():
            return None
        with open(lock_path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                return handle.read().strip() or "another process"
            fcntl.flock(handle, fcntl.LOCK_UN)
        return None

    def unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # --- writing ---------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One durable transaction: committed (fsynced) when the block ends, before anything is acted on."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def create_rollout(
        self, *, selector: str, bundle_path: str, bundle: str, model: str, version: str, prefix: str,
        plan: dict[str, Any], rollout_id: str | None = None, kind: str = "rollout", reason: str | None = None,
    ) -> str:  # fmt: skip
        letter = "b" if kind == "rollback" else "r"
        rollout_id = rollout_id or f"{letter}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        now = time.time()
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM rollouts WHERE id = ?", (rollout_id,)).fetchone():
                raise FleetError(f"rollout {rollout_id} already exists in {self.path}; resume it or pick another id")
            db.execute(
                "INSERT INTO rollouts (id, created_at, updated_at, status, selector, bundle_path, bundle, model,"
                " version, prefix, plan, kind) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                (rollout_id, now, now, selector, bundle_path, bundle, model, version, prefix, json.dumps(plan), kind),
            )
            db.execute(
                "INSERT INTO history (rollout, at, state, reason) VALUES (?, ?, 'running', ?)",
                (rollout_id, now, reason or f"rollout of {model} {version} to {selector}"),
            )
        return rollout_id

    def set_rollout(self, db: sqlite3.Connection, rollout_id: str, **fields: Any) -> None:
        """Within a transaction: update rollout fields (a status change goes to the history too)."""
        now = time.time()
        fields["updated_at"] = now
        names = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE rollouts SET {names} WHERE id = ?", (*fields.values(), rollout_id))
        if "status" in fields:
            db.execute(
                "INSERT INTO history (rollout, at, state, reason) VALUES (?, ?, ?, ?)",
                (rollout_id, now, fields["status"], fields.get("reason")),
            )

    def request(self, rollout_id: str, action: str) -> Rollout:
        """Leave ``action`` (pause, resume, abort, cancel) for the operator of ``rollout_id``."""
        with self.transaction() as db:
            rollout = self.rollout(rollout_id)
            if rollout.status in CLOSED:
                raise FleetError(f"rollout {rollout_id} is {rollout.status}; there is nothing to {action}")
            self.set_rollout(db, rollout_id, request=action)
        return self.rollout(rollout_id)

    def add_device(self, db: sqlite3.Connection, rollout_id: str, device: str, joined: int) -> Execution:
        """Within a transaction: ``device`` joins the rollout ``queued``; returns its execution."""
        now = time.time()
        db.execute(
            "INSERT OR IGNORE INTO executions (rollout, device, joined, state, updated_at) VALUES (?, ?, ?, 'queued', ?)",
            (rollout_id, device, joined, now),
        )
        db.execute(
            "INSERT INTO history (rollout, device, at, state) VALUES (?, ?, ?, 'queued')", (rollout_id, device, now)
        )
        row = db.execute("SELECT * FROM executions WHERE rollout = ? AND device = ?", (rollout_id, device)).fetchone()
        return Execution(**dict(row))

    def set_execution(self, db: sqlite3.Connection, execution: Execution, **fields: Any) -> None:
        """Within a transaction: change a device's execution (a state change goes to the history)."""
        now = time.time()
        fields["updated_at"] = now
        for key, value in fields.items():
            setattr(execution, key, value)
        names = ", ".join(f"{k} = ?" for k in fields)
        db.execute(
            f"UPDATE executions SET {names} WHERE rollout = ? AND device = ?",
            (*fields.values(), execution.rollout, execution.device),
        )
        if "state" in fields:
            db.execute(
                "INSERT INTO history (rollout, device, at, state, code, reason, command_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (execution.rollout, execution.device, now, execution.state, execution.code, execution.reason,
                 execution.rollback_id if execution.state in ("rolling_back", "rolled_back") else execution.command_id),
            )  # fmt: skip

    def next_command_seq(self, db: sqlite3.Connection | None = None) -> int:
        """The ``seq`` of the next command: one more than the last this journal gave (docs/protocol.md).

        Operators that share this journal share the counter, so their commands are ordered by it and never
        by anyone's clock. Within ``db``'s transaction when given (the engine's, so the number is committed
        with the command that carries it), else in a transaction of its own. The first number is the
        clock in µs once, when the counter is made, so it is above every seq of an edgepack that used the
        issue time; from then on the clock is never read again.
        """
        if db is None:
            with self.transaction() as own:
                return self.next_command_seq(own)
        row = db.execute("SELECT value FROM counters WHERE name = 'command_seq'").fetchone()
        value = int(row["value"]) + 1 if row is not None else time.time_ns() // 1000
        db.execute(
            "INSERT INTO counters (name, value) VALUES ('command_seq', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (value,),
        )
        return value

    # --- reading ---------------------------------------------------------------------------------

    def rollout(self, rollout_id: str) -> Rollout:
        row = self.db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if row is None:
            known = [r["id"] for r in self.db.execute("SELECT id FROM rollouts ORDER BY created_at DESC LIMIT 5")]
            raise FleetError(
                f"no rollout {rollout_id!r} in {self.path}"
                + (f"; recent ones: {', '.join(known)}" if known else " (it holds none; check --journal)")
            )
        data = dict(row)
        data["plan"] = json.loads(data["plan"])
        return Rollout(**data)

    def rollouts(self, limit: int = 20) -> list[Rollout]:
        ids = [r["id"] for r in self.db.execute("SELECT id FROM rollouts ORDER BY created_at DESC LIMIT ?", (limit,))]
        return [self.rollout(i) for i in ids]

    def latest_open(self) -> Rollout | None:
        row = self.db.execute(
            f"SELECT id FROM rollouts WHERE status IN ({','.join('?' * len(OPEN))}) ORDER BY created_at DESC",
            OPEN,
        ).fetchone()
        return self.rollout(row["id"]) if row else None

    def executions(self, rollout_id: str) -> list[Execution]:
        rows = self.db.execute("SELECT * FROM executions WHERE rollout = ? ORDER BY joined", (rollout_id,))
        return [Execution(**dict(r)) for r in rows]

    def counts(self, rollout_id: str) -> dict[str, int]:
        rows = self.db.execute("SELECT state, COUNT(*) n FROM executions WHERE rollout = ? GROUP BY state", (rollout_id,))
        return {r["state"]: r["n"] for r in rows}

    def history(self, rollout_id: str, devices: Iterable[str] | None = None) -> list[dict[str, Any]]:
        rows = [dict(r) for r in self.db.execute("SELECT * FROM history WHERE rollout = ? ORDER BY id", (rollout_id,))]
        if devices is not None:
            wanted = set(devices)
            rows = [r for r in rows if r["device"] in wanted]
        return rows
