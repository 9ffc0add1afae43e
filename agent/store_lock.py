"""One process per state directory: an exclusive ``flock`` on ``STATE/lock``, and a note of who holds it.

Two processes on one state directory would each rewrite ``state.json`` from their own view, number their
journals from the same counter, delete bundle directories the other serves from, and each one's boot-time
``recover()`` would mark the other's running install as rolled back. So every process that opens a store as
a device — :class:`edgepack.agent.service.DeviceAgent`, which ``edgepack agent run``, ``edgepack serve`` and
the standalone ``edgepack agent install|rollback`` build — holds an exclusive lock on ``STATE/lock`` for its
whole life.

Why ``flock`` and not a PID file: the kernel drops the lock when the holding process ends, however it ends
(SIGKILL, OOM killer, a crash), so a lock is never stale and nobody has to guess whether a PID still names
the writer. ``flock`` locks belong to an open file description, so a second open in the *same* process is
refused too (two agents in one test process conflict like two processes do). The descriptor is not
inherited across ``exec``.

The file's content is only a note for people and for the CLI: the holder's PID, command line (secrets
redacted), start time and, while ``edgepack agent run`` serves one, its control socket
(``agent/control.py``). It is written after the lock is taken and decides nothing.

Usage::

    lock = StoreLock.acquire(Path("/var/lib/edgepack"))   # StoreLockedError names the holder
    lock.update(control_socket="/var/lib/edgepack/control/agent.sock")
    lock.release()
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack.errors import ConfigError, StoreLockedError

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
_SECRET_FLAGS = ("--token", "--password")


@dataclass
class LockHolder:
    """What the lock file says about the process that holds (or last held) the store."""

    pid: int | None = None
    command: str = ""
    since: str = ""
    control_socket: str | None = None

    def describe(self) -> str:
        if self.pid is None:
            return "an unknown process (its lock note is empty or unreadable)"
        return f"PID {self.pid} (`{self.command or '?'}`, since {self.since or '?'})"


class StoreLock:
    """The exclusive lock on one state directory, held until :meth:`release` (or the process ends)."""

    def __init__(self, state_dir: Path, fd: int, holder: LockHolder) -> None:
        self.state_dir = state_dir
        self.holder = holder
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> StoreLock:
        """Take the lock without waiting; :class:`StoreLockedError` names the holder when it is taken."""
        state_dir = Path(state_dir)
        path = state_dir / LOCK_FILE
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"cannot open the store lock {path}: {exc.strerror}; run as the user that owns the state directory "
                "or give another --state"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = current_holder(state_dir) or read_holder(state_dir)
            raise StoreLockedError(locked_message(state_dir, holder), holder=holder) from None
        except BaseException:
            os.close(fd)
            raise
        lock = cls(state_dir, fd, LockHolder(os.getpid(), _command_line(), _now()))
        lock._write_note()
        log.debug("holding the store lock %s", path)
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def update(self, **fields: Any) -> None:
        """Change the note (e.g. ``control_socket``) while holding the lock."""
        for key, value in fields.items():
            setattr(self.holder, key, value)
        self._write_note()

    def release(self) -> None:
        """Drop the lock (idempotent); the note stays, naming the last holder, and decides nothing."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)  # closing the only descriptor of the open file description releases the flock

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _write_note(self) -> None:
        if self._fd is None:
            return
        data = json.dumps(asdict(self.holder), sort_keys=True).encode() + b"\n"
        # new content first, then cut the old tail: a reader never sees an empty file, and read_holder
        # parses the first JSON value only
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))


def read_holder(state_dir: Path) -> LockHolder | None:
    """The note in ``STATE/lock``: who holds the store, or held it last (the file says nothing of which)."""
    try:
        raw = (Path(state_dir) / LOCK_FILE).read_bytes()
    except OSError:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(raw.decode("utf-8", "replace").lstrip())
    except ValueError:
        return LockHolder()
    if not isinstance(value, dict):
        return LockHolder()
    pid = value.get("pid")
    socket_path = value.get("control_socket")
    return LockHolder(
        pid=pid if isinstance(pid, int) else None,
        command=str(value.get("command", "")),
        since=str(value.get("since", "")),
        control_socket=socket_path if isinstance(socket_path, str) and socket_path else None,
    )


def holder_pid(state_dir: Path) -> int | None:
    """The PID that holds the lock now, from the kernel's ``/proc/locks`` (None: nobody, or not Linux).

    Asking the kernel, not taking the lock, so a probe (``edgepack agent status``) never makes a daemon
    that starts at that instant find its store taken."""
    try:
        info = os.stat(Path(state_dir) / LOCK_FILE)
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    inode = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE" and fields[5] == inode:
            return int(fields[4]) if fields[4].isdigit() else None
    return None


def current_holder(state_dir: Path) -> LockHolder | None:
    """Who holds the lock now (None: nobody): the note, checked against the kernel's PID when it has one."""
    pid = holder_pid(state_dir)
    note = read_holder(state_dir)
    if pid is None:
        return None
    if note is not None and note.pid == pid:
        return note
    return LockHolder(pid=pid, command=_proc_command(pid))  # the note is not written yet, or stale


def _proc_command(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return ""
    return _redacted([a.decode(errors="replace") for a in argv])


def locked_message(state_dir: Path, holder: LockHolder | None) -> str:
    who = (holder or LockHolder()).describe()
    return (
        f"state directory {state_dir} is in use by {who}; only one process may use a state directory at a time. "
        f"If that is the device daemon (`edgepack agent run`), `edgepack agent install|rollback|status --state "
        f"{state_dir}` go through its control socket; otherwise stop that process first or use another --state."
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _command_line() -> str:
    """This process's command line for the note, with the values of secret-carrying flags replaced."""
    return _redacted(list(sys.argv))


def _redacted(argv: list[str]) -> str:
    argv = argv or ["?"]
    program = Path(argv[0])
    argv[0] = f"python -m {program.parent.name}" if program.name == "__main__.py" else program.name
    shown = []
    hide_next = False
    for arg in argv:
        if hide_next:
            shown.append("***")
            hide_next = False
        elif arg in _SECRET_FLAGS:
            shown.append(arg)
            hide_next = True
        elif arg.startswith(tuple(f"{flag}=" for flag in _SECRET_FLAGS)):
            shown.append(arg.split("=", 1)[0] + "=***")
        else:
            shown.append(arg)
    return " ".join([shown[0], *map(shlex.quote, shown[1:])])
