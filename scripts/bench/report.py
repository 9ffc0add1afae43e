"""Render the runner's results (``bench-results/results.json``) as ``docs/benchmarks.md`` with PNG plots.

The markdown and every figure name the machine (CPU model, its int8 instruction-set extensions — VNNI, AMX,
ARM dot-product — and core count), the versions, and how each figure was measured, so a plot copied out of
the page still says where it came from. Plots are matplotlib (``Agg``, no display), drawn from plain specs
that the benchmarks put in their sections:

    {"kind": "bars", "file": "x.png", "title": str, "ylabel": str, "groups": [str], "series": {name: [float]},
     "log": bool}
    {"kind": "lines", "file": "x.png", "title": str, "xlabel": str, "ylabel": str, "x": [float],
     "series": {name: [float]}}
    {"kind": "timeline", "file": "x.png", "title": str, "t": [s], "ms": [float], "spans": [[s, s]],
     "failed_t": [s]}

A section with ``"int8_figures": true`` gets this CPU's int8 instructions (or "none ...") written right above
its plot, not only in the page header.

    .venv/bin/python scripts/bench/report.py [bench-results/results.json] [--docs docs]   # re-render only
"""

from __future__ import annotations

import argparse
import json
import logging
import textwrap
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.report")
REPO = Path(__file__).resolve().parents[2]

INT8_FLAGS = {"avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8", "asimddp": "ARM dot-product",
              "i8mm": "ARM i8mm"}  # fmt: skip


def int8_line(machine: dict[str, Any]) -> str:
    """What this CPU has for int8 arithmetic, in words; says so plainly when it has none."""
    found = [INT8_FLAGS[f] for f in machine.get("isa", []) if f in INT8_FLAGS]
    if not found:
        return "int8 instructions: none (no VNNI, AMX or dot-product): int8 figures here understate int8 elsewhere"
    return "int8 instructions: " + ", ".join(found)


def machine_line(machine: dict[str, Any]) -> str:
    isa = ", ".join(machine.get("isa", [])) or "none of the tracked extensions"
    return f"{machine.get('cpu', '?')} · {machine.get('cores', '?')} cores · ISA: {isa}"


def versions_line(versions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items())


# --- plots ---------------------------------------------------------------------------------------


def plot(spec: dict[str, Any], path: Path, caption: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caption_lines = textwrap.wrap(caption, 150)
    caption_in = 0.13 * len(caption_lines) + 0.15  # inches under the axes for the caption
    fig, ax = plt.subplots(figsize=(9, 5 + caption_in))
    kind = spec["kind"]
    if kind == "bars":
        groups, series = spec["groups"], spec["series"]
        width = 0.8 / max(len(series), 1)
        for i, (name, values) in enumerate(series.items()):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, [v if v is not None else 0 for v in values], width, label=name)
        ax.set_xticks(range(len(groups)), groups)
        if spec.get("log"):
            ax.set_yscale("log")
    elif kind == "lines":
        for name, values in spec["series"].items():
            ax.plot(spec["x"], values, marker="o", label=name)
        ax.set_xlabel(spec.get("xlabel", ""))
        if spec.get("log"):
            ax.set_yscale("log")
    elif kind == "timeline":
        ax.scatter(spec["t"], spec["ms"], s=3, alpha=0.6, label="request latency")
        for i, (a, b) in enumerate(spec.get("spans", [])):
            ax.axvspan(a, b, color="orange", alpha=0.25, label="swap window" if i == 0 else None)
        failed = spec.get("failed_t", [])
        if failed:
            ax.scatter(failed, [0] * len(failed), marker="x", color="red", label=f"failed ({len(failed)})")
        ax.set_xlabel("seconds since load started")
    else:
        raise ValueError(f"unknown plot kind {kind!r}")
    ax.set_ylabel(spec.get("ylabel", "ms"))
    ax.set_title(spec["title"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, "\n".join(caption_lines), fontsize=6.5, va="bottom", ha="left")
    fig.tight_layout(rect=(0, caption_in / (5 + caption_in), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- markdown ------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> list[str]:
    if not rows:
        return ["(no rows)"]
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def _ratios(ratios: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> list[str]:
    rows = []
    for r in ratios:
        met = r.get("met")
        rows.append({"ratio": r["what"], "value": r.get("value"), "goal": r.get("goal", "—"),
                     "met": "—" if met is None else ("yes" if met else "**no**"),
                     **{k: r.get(k) for k in extra}})  # fmt: skip
    return table(rows, ["ratio", "value", "goal", "met", *extra])


def render(doc: dict[str, Any], figures: Path, docs: Path) -> str:
    mach, vers = doc["machine"], doc.get("versions", {})
    caption_base = f"{machine_line(mach)} · {int8_line(mach)} · {versions_line(vers)}"
    lines = [
        "# Benchmarks",
        "",
        "<!-- generated by scripts/bench/run from bench-results/results.json; edit scripts/bench/report.py, "
        "not this file -->",
        "",
        f"- **Machine:** {machine_line(mach)}",
        f"- **{int8_line(mach)}**",
        f"- **Versions:** Python {mach.get('python', '?')}, {versions_line(vers)}",
        f"- **Last run:** {doc['when']}; each section names when it ran and whether it was a `--quick` run "
        "(short windows, small sizes)",
        "",
        "Reproduce with `scripts/bench/run` (all, may take long) or `scripts/bench/run NAME… [--quick]`; "
        "names: " + ", ".join(f"`{n}`" for n in doc["sections"]) + ". "
        "Every comparison below was measured side by side in one run on this machine and is quoted as a "
        "ratio; absolute figures depend on the machine (and on what else ran on it: load client, servers and "
        "peers share its cores). Benchmarks never fail on a number.",
        "",
    ]
    if doc.get("note"):
        lines += [f"> **Note on this run:** {doc['note']}", ""]
    headline = [
        {
            **r,
            "what": f"{sec.get('title', n).split(':')[0]}: {r['what']}",
            "run": "quick" if sec.get("quick") else "full",
            "load average": sec.get("host_load_1m"),
        }
        for n, sec in doc["sections"].items()
        for r in sec.get("ratios", [])
        if r.get("met") is not None
    ]
    if headline:
        lines += ["## Goals at a glance", "", *_ratios(headline, ("run", "load average")), ""]
    for name, section in doc["sections"].items():
        lines += [f"## {section.get('title', name)}", ""]
        stamp = section.get("when", doc["when"])
        lines += [f"_`{name}` · {stamp}{' · quick' if section.get('quick') else ''} · "
                  f"{section.get('wall_s', '?')} s · {machine_line(mach)}"
                  + (f" · load average {section['host_load_1m']}" if section.get("host_load_1m") else "")
                  + "_", ""]  # fmt: skip
        if "error" in section:
            lines += [f"**Not measured:** {section['error']}", ""]
            if section.get("log_tail"):
                lines += ["```", *section["log_tail"], "```", ""]
            continue
        if section.get("method"):
            lines += [f"**How:** {section['method']}", ""]
        if section.get("ratios"):
            lines += [*_ratios(section["ratios"]), ""]
        for t in section.get("tables", []):
            lines += [f"**{t['title']}**", "", *table(t["rows"], t.get("columns")), ""]
        extra_versions = section.get("versions") or {}
        caption = caption_base + (" · " + versions_line(extra_versions) if extra_versions else "")
        if section.get("int8_figures"):  # int8 speed depends on these instructions: said next to the figure
            lines += [f"**This CPU's {int8_line(mach)}.**", ""]
        for spec in section.get("plots", []):
            png = plot(spec, figures / spec["file"], f"{caption} · {section.get('method', '')}")
            lines += [f"![{spec['title']}]({png.relative_to(docs).as_posix()})", ""]
        notes = list(section.get("notes", []))
        if extra_versions:
            notes.append("Versions for this section: " + versions_line(extra_versions) + ".")
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(lines).rstrip() + "\n"


def write(doc: dict[str, Any], markdown: Path, figures: Path) -> Path:
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render(doc, figures, markdown.parent))
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="?", default=REPO / "bench-results" / "results.json")
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    doc = json.loads(args.results.read_text())
    log.info("wrote %s", write(doc, args.docs / "benchmarks.md", args.docs / "benchmarks"))


if __name__ == "__main__":
    main()
