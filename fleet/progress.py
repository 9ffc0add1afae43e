"""How a rollout shows its progress: a live rich display for people, JSON lines for machines."""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edgepack.fleet.engine import RolloutObserver, Snapshot

ORDER = ("queued", "notified", "downloading", "installing", "soaking", "succeeded", "failed", "rejected",
         "timed_out", "canceled", "rolling_back", "rolled_back")  # fmt: skip
COLOURS = {"succeeded": "green", "failed": "red", "rejected": "red", "timed_out": "yellow", "rolled_back": "magenta"}


def render(snapshot: Snapshot, failures: int = 8) -> Group:
    """The display of one snapshot: the rollout line, counts per state, the latest failures with reasons."""
    waves = " → ".join(
        f"[bold]{w}[/]" if i == snapshot.wave else w for i, w in enumerate(snapshot.waves)
    )
    head = Text.from_markup(
        f"rollout [bold]{snapshot.rollout}[/]  [{'green' if snapshot.status == 'completed' else 'cyan'}]"
        f"{snapshot.status}[/]  waves {waves}  devices {snapshot.total}"
    )
    counts = Table(box=None, show_header=True, pad_edge=False)
    shown = [s for s in ORDER if snapshot.counts.get(s)]
    for state in shown:
        counts.add_column(state, justify="right", style=COLOURS.get(state, ""))
    counts.add_row(*(str(snapshot.counts[s]) for s in shown))
    parts: list[Any] = [head, counts]
    if snapshot.reason:
        parts.append(Text(snapshot.reason, style="dim"))
    if snapshot.failures:
        table = Table("device", "state", "code", "reason", title="failures", title_justify="left")
        for device, state, code, reason in snapshot.failures[-failures:]:
            table.add_row(device, state, code or "", (reason or "")[:100])
        parts.append(table)
    return Group(*parts)


class RichRolloutObserver(RolloutObserver):
    """A live display, refreshed after each step that changed something."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def snapshot(self, snapshot: Snapshot) -> None:
        self.live.update(render(snapshot))

    def close(self) -> None:
        self.live.stop()


class JsonLinesObserver(RolloutObserver):
    """One JSON object per line: each transition as the journal records it, and the counts after each step."""

    def __init__(self, out: IO[str] | None = None, *, counts: bool = True) -> None:
        self.out = out or sys.stdout
        self.counts = counts

    def transition(self, rollout: str, device: str | None, state: str, code: str | None, reason: str | None) -> None:
        record = {"at": round(time.time(), 3), "rollout": rollout, "device": device, "state": state,
                  "code": code, "reason": reason}  # fmt: skip
        self._write({"kind": "rollout" if device is None else "device", **record})

    def snapshot(self, snapshot: Snapshot) -> None:
        if self.counts:
            self._write({"kind": "counts", "at": round(time.time(), 3), "rollout": snapshot.rollout,
                         "status": snapshot.status, "wave": snapshot.wave, "counts": snapshot.counts})  # fmt: skip

    def _write(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()
