"""What runs inside the emulated aarch64 Python (and natively on the host, for the reference outputs).

``python guest.py JOB.json`` — for each bundle of the job, as the agent stages one: verify and extract it
against the trust store, check the runtime version it needs, load it with its runtime backend (one
thread), replay its self-test vectors through edgepack's own self-test code and keep every output. Per
bundle it writes into the bundle's ``out`` folder:

    started        before anything else, so a process that dies (qemu: "uncaught target signal 11")
                   shows which bundle it died on
    result.json    what happened: error, self-test mismatches and max differences, runtime version,
                   machine, delegated nodes
    outputs.npz    sample s, output k -> ``s<s>_o<k>`` (names in result.json; no pickles)

Job: ``{"label", "site": [folders for sys.path], "trust", "threads", "work", "bundles": [{"path", "out"}]}``.

Only the standard library is imported before the job's site folders are on ``sys.path`` (the guest
Python runs with ``-S``: no site-packages of the rootfs or, through qemu's path fallback, of the host).
A failing bundle is recorded in its result and the next one runs; nothing is swallowed: the host
reports every recorded error.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import site
import sys
import tempfile
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("armcheck.guest")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="guest %(relativeCreated)6.0f ms: %(message)s")
    job = json.loads(Path(argv[1]).read_text())
    for folder in job["site"]:
        site.addsitedir(folder)  # processes .pth files too
    for index, item in enumerate(job["bundles"]):
        out = Path(item["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "started").touch()
        log.info("bundle %d: %s on %s", index, item["path"], platform.machine())
        try:
            result = _run_bundle(Path(item["path"]), Path(job["trust"]), job["threads"], Path(job["work"]), out)
        except Exception as exc:  # recorded in result.json and reported by the host as this bundle's failure
            log.error("bundle %d failed: %s", index, exc)
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        result["machine"] = platform.machine()
        tmp = out / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out / "result.json")
    log.info("all %d bundle(s) done", len(job["bundles"]))
    return 0


def _run_bundle(bundle: Path, trust_dir: Path, threads: int, work: Path, out: Path) -> dict[str, Any]:
    import numpy as np

    from edgepack.bundle import extract_bundle
    from edgepack.errors import RuntimeBackendError, SelfTestError
    from edgepack.runtimes.base import RuntimeOptions, get_backend
    from edgepack.selftest import evaluate_selftest
    from edgepack.trust import TrustStore

    with tempfile.TemporaryDirectory(prefix="armcheck-bundle-", dir=work) as tmp:
        extracted = Path(tmp) / "bundle"
        manifest = extract_bundle(bundle, extracted, TrustStore.load(trust_dir))
        if manifest.selftest is None:
            raise SelfTestError(
                f"{manifest.name} {manifest.version} carries no self-test vectors, so there is nothing to compare; "
                "bundles made by 'edgepack compile' carry them ('edgepack bundle create' adds none)"
            )
        backend = get_backend(manifest.runtime.name)
        installed = backend.installed_version() or "0"
        if not manifest.runtime.admits(installed):
            raise RuntimeBackendError(
                f"{manifest.name} {manifest.version} needs {manifest.runtime.name} {manifest.runtime.version}; "
                f"the device side has {installed}"
            )
        model = backend.load(
            extracted / manifest.model_file,
            inputs=list(manifest.inputs),
            outputs=list(manifest.outputs),
            execution=manifest.execution,
            options=RuntimeOptions(threads=threads),
        )
        recorder = _Recorder(model)
        try:
            report = evaluate_selftest(
                recorder, extracted / manifest.selftest.vectors, manifest.selftest.atol, manifest.selftest.rtol
            )
            delegation = model.describe()  # which delegate the loaded graph shows (LiteRT backend)
        finally:
            model.close()
    names = [spec.name for spec in model.outputs]
    arrays = {
        f"s{s}_o{k}": np.asarray(got[name]) for s, got in enumerate(recorder.results) for k, name in enumerate(names)
    }
    np.savez(out / "outputs.npz", allow_pickle=False, **arrays)
    return {
        "ok": True,
        "error": None,
        "bundle": {
            "name": manifest.name,
            "version": manifest.version,
            "target": manifest.target,
            "runtime": manifest.runtime.name,
            "atol": manifest.selftest.atol,
            "rtol": manifest.selftest.rtol,
        },
        "runtime_version": installed,
        "samples": report.samples,
        "outputs": names,
        "selftest": {
            "max_abs_diff": report.max_abs_diff,
            "mismatches": [
                {
                    "sample": m.sample,
                    "output": m.output,
                    "max_abs_diff": m.max_abs_diff,
                    "allowed": m.allowed,
                    "reason": m.reason,
                    "text": str(m),
                }
                for m in report.mismatches
            ],
        },
        "delegation": delegation,
    }


class _Recorder:
    """A LoadedModel stand-in that keeps every output the self-test produces."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.inputs = model.inputs
        self.outputs = model.outputs
        self.results: list[dict[str, Any]] = []

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        got = self._model.infer(inputs)
        self.results.append(got)
        return got

    def close(self) -> None:
        self._model.close()


if __name__ == "__main__":
    status = main(sys.argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: under emulation it costs seconds, and every result is on disk.
    os._exit(status)
