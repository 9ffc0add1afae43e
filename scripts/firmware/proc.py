"""Running the build's tools: every line they print goes to the build log, the latest one to the progress bar."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from firmware import FirmwareError

log = logging.getLogger(__name__)

LineHook = Callable[[str], None]


def run(
    argv: Sequence[str | Path],
    *,
    what: str,
    on_line: LineHook | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> list[str]:
    """Run ``argv``; returns its output lines (stdout and stderr together). FirmwareError naming ``what``
    and the last lines of output when it fails."""
    args = [str(a) for a in argv]
    log.debug("running %s", " ".join(args))
    lines: list[str] = []
    try:
        process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd, bufsize=1
        )
    except FileNotFoundError as exc:
        raise FirmwareError(f"{what}: {args[0]} is not installed ({exc.strerror})") from exc
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.rstrip()
        lines.append(line)
        log.debug("%s: %s", Path(args[0]).name, line)
        if on_line is not None and line.strip():
            on_line(line.strip())
    if process.wait() != 0:
        tail = "\n".join(lines[-30:])
        raise FirmwareError(f"{what} failed (exit {process.returncode}):\n{tail}")
    return lines
