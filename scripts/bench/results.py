"""Shared by the benchmarks: write a results file (JSON) and a markdown table beside it."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    import os

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }


def write_results(name: str, rows: list[dict[str, Any]], *, title: str, notes: list[str] | None = None) -> Path:
    """Write results/NAME.json and results/NAME.md; returns the markdown path."""
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    doc = {"benchmark": name, "when": stamp, "machine": machine(), "rows": rows, "notes": notes or []}
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = [f"# {title}", "", f"{stamp} · {doc['machine']}", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    lines += ["", *[f"- {n}" for n in notes or []]]
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md
