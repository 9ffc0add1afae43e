"""Crash points inside a real agent process, armed from the environment, at the file-system boundary.

The crash harness (``tests/harness/crash.py``) starts ``edgepack agent run`` through
``tests/harness/agent_child.py``, which calls :func:`arm` before the CLI runs. ``EDGEPACK_TEST_CRASH_AT``
names one point; when the process reaches it, it SIGKILLs itself (no cleanup, no flush of Python buffers)
after writing ``EDGEPACK_TEST_CRASH_MARK`` so the harness knows where it died.

Why at the file-system boundary and not inside the installer: every step the device persists goes through
``os.replace`` (atomic writes, the staging rename, the assembled transfer), ``os.fsync`` (payload files,
the partial transfer) and ``os.pwrite`` (chunks into ``bundle.part``). Wrapping those three functions gives
exact crash points without one line of test code in the product, and it keeps working while the product's
modules are refactored. The install state machine's steps are seen the same way: the journal records each
state *before* its work starts, so "right after the journal says ``stage``" is the on_state hook's point.

Spec: ``KIND:PATTERN:N`` — die at the N-th (1-based) event of KIND whose path matches PATTERN
(``fnmatch`` on the last two path components, ``parent/name``)::

    journal:stage:1          right after the journal recorded state "stage" (verify, stage, switch, commit,
                             committed, rolled_back, start)
    replace:*/state.json:1   just before state.json is renamed into place (its temporary file is written)
    replaced:*/state.json:1  just after the rename, before the directory fsync
    fsync:*.staging/*:1      just before the first payload file in an extraction staging directory is synced
    pwrite:*:3               just before the third chunk write into a partial transfer
"""

from __future__ import annotations

import fnmatch
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV_POINT = "EDGEPACK_TEST_CRASH_AT"
ENV_MARK = "EDGEPACK_TEST_CRASH_MARK"
KINDS = ("journal", "replace", "replaced", "fsync", "pwrite")


def _tail(path: Any) -> str:
    parts = Path(os.fsdecode(path)).parts
    return "/".join(parts[-2:])


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class CrashPoint:
    """One armed point: counts matching events and kills the process at the N-th."""

    def __init__(self, spec: str, mark: str | None) -> None:
        kind, pattern, count = spec.rsplit(":", 2) if spec.count(":") >= 2 else (spec, "*", "1")
        if kind not in KINDS:
            raise ValueError(f"unknown crash point kind {kind!r} in {spec!r}; known: {', '.join(KINDS)}")
        self.spec = spec
        self.kind = kind
        self.pattern = pattern
        self.remaining = int(count)
        self.mark = mark

    def hit(self, kind: str, subject: str) -> None:
        if kind != self.kind or not fnmatch.fnmatchcase(subject, self.pattern):
            return
        self.remaining -= 1
        if self.remaining == 0:
            self.die(subject)

    def die(self, subject: str) -> None:
        if self.mark:
            with open(self.mark, "w") as fh:  # plain open/write: nothing here goes through the patched calls
                fh.write(json.dumps({"point": self.spec, "subject": subject, "pid": os.getpid()}))
        os.kill(os.getpid(), signal.SIGKILL)


def _journal_state(src: Any) -> str | None:
    try:
        with open(src, "rb") as fh:
            return str(json.load(fh).get("state"))
    except (OSError, ValueError, AttributeError):
        return None


def arm(environ: dict[str, str] | None = None) -> CrashPoint | None:
    """Arm the point named in the environment (nothing when it names none); returns it."""
    environ = dict(os.environ if environ is None else environ)
    spec = environ.get(ENV_POINT)
    if not spec:
        return None
    point = CrashPoint(spec, environ.get(ENV_MARK))
    real_replace: Callable[..., None] = os.replace
    real_rename: Callable[..., None] = os.rename
    real_fsync: Callable[[int], None] = os.fsync
    real_pwrite: Callable[..., int] = os.pwrite

    def renamer(real: Callable[..., None]) -> Callable[..., None]:
        def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            tail = _tail(dst)
            point.hit("replace", tail)
            state = _journal_state(src) if point.kind == "journal" and tail.startswith("journal/") else None
            real(src, dst, *args, **kwargs)
            point.hit("replaced", tail)
            if state is not None:
                point.hit("journal", state)

        return rename

    def fsync(fd: int) -> None:
        if point.kind == "fsync":
            point.hit("fsync", _tail(_fd_path(fd)))
        real_fsync(fd)

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if point.kind == "pwrite":
            point.hit("pwrite", _tail(_fd_path(fd)))
        return real_pwrite(fd, data, offset)

    os.replace = renamer(real_replace)  # type: ignore[assignment]
    os.rename = renamer(real_rename)  # type: ignore[assignment]
    os.fsync = fsync  # type: ignore[assignment]
    os.pwrite = pwrite  # type: ignore[assignment]
    return point
