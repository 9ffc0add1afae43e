"""The runner's fleet section: runs ``bench_fleet.py`` (the whole-fleet rollout benchmark) as it is, in a child
process, and turns the results file it writes into a section (rollout time and broker ingress against fleet
size, with a plot). The benchmark itself stays the one place that measures; this only reads its output, so
its columns are read by name and a missing one shows as a gap, not an error.

    .venv/bin/python scripts/bench/bench_fleet_section.py [--quick]    # prints the section as JSON
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results import RESULTS  # noqa: E402

SCRIPT = HERE / "bench_fleet.py"


def bench(quick: bool) -> dict[str, Any]:
    title = "Fleet: rollout time and broker ingress against fleet size"
    if not SCRIPT.exists():
        return {"title": title, "error": f"{SCRIPT.name} is not in this checkout"}
    devices, size_mb = (["5", "20"], "1") if quick else (["100", "300", "1000"], "5")
    cmd = [sys.executable, str(SCRIPT), "--devices", *devices, "--size-mb", size_mb]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    results = RESULTS / "fleet.json"
    if proc.returncode != 0 or not results.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        return {"title": title, "error": f"{SCRIPT.name} exited with {proc.returncode}", "log_tail": tail}
    doc = json.loads(results.read_text())
    rows = doc.get("rows", [])
    ok = [r for r in rows if isinstance(r.get("devices"), int)]
    plots = []
    if ok:
        plots.append({"kind": "lines", "file": "fleet_rollout.png", "title": "Rollout wall time against fleet size",
                      "xlabel": "devices", "ylabel": "seconds", "x": [r["devices"] for r in ok],
                      "series": {"rollout wall s": [r.get("wall_s") for r in ok]}})  # fmt: skip
        plots.append({"kind": "lines", "file": "fleet_ingress.png",
                      "title": "Broker ingress over the rollout, as multiples of the bundle", "xlabel": "devices",
                      "ylabel": "× bundle size", "x": [r["devices"] for r in ok],
                      "series": {"ingress × bundle": [r.get("ingress_x_bundle") for r in ok]}})  # fmt: skip
    ratios = [{"what": f"broker ingress / bundle size, {r['devices']} devices", "value": r.get("ingress_x_bundle"),
               "goal": "<= 1.1 + a few kB per device", "met": None} for r in ok]  # fmt: skip
    return {
        "title": title,
        "method": (
            f"`{SCRIPT.name} --devices {' '.join(devices)} --size-mb {size_mb}` as it is: one local "
            "mosquitto, simulated devices (real agent and link per device, stand-in runtime), a separate "
            "`edgepack fleet rollout` operator; see that script's docstring"
        ),
        "ratios": ratios,
        "tables": [{"title": "Rollout per fleet size", "rows": rows}],
        "plots": plots,
        "notes": doc.get("notes", []),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(bench(args.quick), indent=2))


if __name__ == "__main__":
    main()
