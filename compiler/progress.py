"""How the pipeline reports progress: one line per step, with a bar where a step counts work.

The pipeline knows nothing of terminals. It calls a :class:`Progress`; the default one logs each step,
and the CLI hands in one that draws a rich progress display (``edgepack.cli.compile_cmd``).

    with progress.step("quantize int8", total=len(samples)) as step:
        ...
        step.advance()
        step.detail("3 nodes kept in float")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class Step:
    """Handle to the running step: move its bar, change its total, say something about it."""

    def __init__(self, name: str, total: int | None) -> None:
        self.name = name
        self.total = total
        self.done = 0
        self.note = ""

    def advance(self, n: int = 1) -> None:
        self.done += n

    def set_total(self, total: int | None) -> None:
        self.total = total

    def detail(self, text: str) -> None:
        self.note = text


class Progress:
    """Progress sink that logs each step's start and end (with its duration and detail)."""

    @contextmanager
    def step(self, name: str, total: int | None = None) -> Iterator[Step]:
        handle = self._open(name, total)
        started = time.perf_counter()
        ok = False
        try:
            yield handle
            ok = True
        finally:
            self._close(handle, ok, time.perf_counter() - started)

    def _open(self, name: str, total: int | None) -> Step:
        log.info("%s ...", name)
        return Step(name, total)

    def _close(self, step: Step, ok: bool, seconds: float) -> None:
        status = "done" if ok else "failed"
        log.info("%s %s in %.1fs%s", step.name, status, seconds, f": {step.note}" if step.note else "")
