"""Shared by the benchmarks: write a results file (JSON) and a markdown table beside it, and load another
script (a benchmark or a model-making script) as a module to reuse its helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

# EDGEPACK_BENCH_RESULTS redirects every script's results files (scripts/bench/run points it at bench-results/raw,
# so a quick run never overwrites the committed figures in scripts/bench/results/).
RESULTS = Path(os.environ.get("EDGEPACK_BENCH_RESULTS") or Path(__file__).parent / "results")


def load_script(path: Path, name: str) -> ModuleType:
    """The Python file at ``path`` imported as module ``name`` (registered in ``sys.modules``, where
    dataclasses look their module up)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp", "i8mm")


def machine() -> dict[str, Any]:
    """The CPU model, the instruction-set extensions that decide int8 speed (VNNI above all), cores."""
    import os

    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in ("", platform.machine()):
                cpu = value.strip()
            if key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": cpu,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }


def add_speedups(rows: list[dict[str, Any]], prefix: str = "speedup_") -> None:
    """Give every row after the first (the baseline) ``<prefix><what>`` = baseline ms / row ms for each of
    the baseline's ``ms_<what>`` columns."""
    base = rows[0]
    for row in rows[1:]:
        for key in [k for k in base if k.startswith("ms_") and row.get(k)]:
            row[prefix + key[3:]] = round(base[key] / row[key], 2)


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
