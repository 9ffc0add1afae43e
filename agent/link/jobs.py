"""A link job — one accepted command on its way to a result — its states, its deadline, and the queue.

The states, named once here (``docs/agent.md`` lists them)::

    queued ──► checking ──► index ──► download ──► install ──► committed | rolled_back | failed
      │            │          │          │   (rollback ──►)
      └────────────┴──────────┴──────────┴──► superseded (pre-empted)  |  failed (expired, deadline, stalled)

A job may be **pre-empted** while it is ``queued``, ``checking``, fetching its ``index`` or in ``download``:
a newer install of the same model supersedes it, a rollback of the same model cancels it; the transfer
stops cleanly (what arrived stays on disk only if a pending command still needs it). Once in ``install``
the install state machine runs to its own end — it settles every step and cannot be interrupted halfway
— and the job reports what truly happened.

Every job has a **deadline** (``LinkSettings.deadline_s``: a floor plus the bundle's size at a minimum
rate), counted from when this process started it, and the command's ``expires_at`` is checked again at
every step: on resume after a reboot, when the worker takes the job, and while it fetches.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgepack.agent.link.book import expired
from edgepack.errors import CommandExpiredError, JobDeadlineError
from edgepack.protocol import InstallCommand, RollbackCommand, SignedCommand

if TYPE_CHECKING:
    from edgepack.agent.receiver import Transfer


class JobState(str, enum.Enum):
    """Where a job is; the terminal ones are the outcomes of the ``result`` event."""

    QUEUED = "queued"  # accepted and persisted, waiting for the worker
    CHECKING = "checking"  # expiry, target, already active
    INDEX = "index"  # waiting for the chunk index the command pins
    DOWNLOAD = "download"  # fetching the missing chunks
    INSTALL = "install"  # DeviceAgent.install: verify → stage → switch → commit (runs to its end)
    ROLLBACK = "rollback"  # DeviceAgent.rollback (runs to its end)
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    SUPERSEDED = "superseded"

    @property
    def preemptible(self) -> bool:
        return self in PREEMPTIBLE

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


PREEMPTIBLE = frozenset({JobState.QUEUED, JobState.CHECKING, JobState.INDEX, JobState.DOWNLOAD})
TERMINAL = frozenset({JobState.COMMITTED, JobState.ROLLED_BACK, JobState.FAILED, JobState.SUPERSEDED})


class Stopped(Exception):
    """The link is stopping; the job stays pending and resumes at the next start."""


class Preempted(Exception):
    """A newer command for the same model replaced the running job (``code``: superseded or canceled)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class Job:
    signed: SignedCommand
    deadline_s: float
    resumed: bool = False
    state: JobState = JobState.QUEUED
    transfer: Transfer | None = None
    started: float | None = None  # monotonic; the deadline counts from here
    _preempted: tuple[str, str] | None = field(default=None, repr=False)
    _stopping: threading.Event | None = field(default=None, repr=False)

    @property
    def command(self) -> InstallCommand | RollbackCommand:
        return self.signed.command

    @property
    def id(self) -> str:
        return self.signed.command.id

    def begin(self, stopping: threading.Event) -> None:
        self.started = time.monotonic()
        self._stopping = stopping

    def preempt(self, code: str, reason: str) -> bool:
        """Ask the job to end as superseded; True when it still can (it has not reached ``install``)."""
        if not self.state.preemptible:
            return False
        self._preempted = (code, reason)
        return True

    @property
    def remaining_s(self) -> float:
        if self.started is None:
            return self.deadline_s
        return self.deadline_s - (time.monotonic() - self.started)

    def check(self) -> None:
        """Raise if the job must not go on: stopping, pre-empted, expired, past its deadline."""
        if self._stopping is not None and self._stopping.is_set():
            raise Stopped()
        if self._preempted is not None and self.state.preemptible:
            raise Preempted(*self._preempted)
        if expired(self.signed):
            raise CommandExpiredError(
                f"command {self.id} ({self.command.action} {self.command.model}) expired at "
                f"{self.command.expires_at.isoformat()} while {self.state.value}; not run further"  # type: ignore[union-attr]
            )
        if self.remaining_s <= 0:
            raise JobDeadlineError(
                f"command {self.id} ({self.command.action} {self.command.model}) ran past its deadline of "
                f"{self.deadline_s:.0f} s while {self.state.value} ([link] deadline_min_s / deadline_rate)"
            )

    def set_state(self, state: JobState) -> None:
        self.check()
        self.state = state


class JobQueue:
    """The jobs waiting for the one worker, and the one it runs; rollbacks go ahead of queued installs."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._jobs: list[Job] = []
        self._current: Job | None = None
        self._closed = False

    def put(self, job: Job) -> None:
        with self._cv:
            if isinstance(job.command, RollbackCommand):
                at = next((i for i, j in enumerate(self._jobs) if not isinstance(j.command, RollbackCommand)), None)
                self._jobs.insert(len(self._jobs) if at is None else at, job)
            else:
                self._jobs.append(job)
            self._cv.notify_all()

    def extend(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.put(job)

    def remove(self, command_id: str) -> Job | None:
        """Take a queued (not running) job out; None when it is not queued."""
        with self._cv:
            job = next((j for j in self._jobs if j.id == command_id), None)
            if job is not None:
                self._jobs.remove(job)
            return job

    def preempt(self, command_id: str, code: str, reason: str) -> str | None:
        """Pre-empt job ``command_id``: ``"removed"`` (it was queued), ``"signalled"`` (running: it stops at its
        next check), ``"installing"`` (too late: it runs to its end), or None (not here)."""
        with self._cv:
            job = next((j for j in self._jobs if j.id == command_id), None)
            if job is not None:
                self._jobs.remove(job)
                return "removed"
            current = self._current
            if current is None or current.id != command_id:
                return None
            if not current.preempt(code, reason):
                return "installing"
        if current.transfer is not None:
            current.transfer.poke()
        return "signalled"

    def take(self, timeout: float) -> Job | None:
        """The next job (it becomes :attr:`current`), or None after ``timeout`` or once closed."""
        with self._cv:
            if not self._jobs and not self._closed:
                self._cv.wait(timeout)
            if self._closed or not self._jobs:
                return None
            self._current = self._jobs.pop(0)
            return self._current

    def done(self, job: Job) -> None:
        with self._cv:
            if self._current is job:
                self._current = None

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def reopen(self) -> None:
        with self._cv:
            self._closed = False
            self._jobs.clear()

    @property
    def current(self) -> Job | None:
        with self._cv:
            return self._current

    def queued_ids(self) -> list[str]:
        with self._cv:
            return [j.id for j in self._jobs]

    @property
    def busy(self) -> bool:
        with self._cv:
            return self._current is not None or bool(self._jobs)
