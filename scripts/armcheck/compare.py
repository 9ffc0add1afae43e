"""Turn the runs into verdicts: per bundle, the host's self-test, and per emulated CPU four checks.

    ran          the emulated agent verified, loaded and ran the bundle (else: its error, or how the
                 process died and on which bundle)
    self-test    every sample's outputs within the bundle's tolerance of its self-test vectors
                 (``|got - expected| <= atol + rtol * |expected|``); a failure names the sample, the
                 output and the difference
    host         the same outputs, within the same tolerance, as the host computed natively
    xnnpack      LiteRT logged the creation of its XNNPACK delegate in that process, and the delegate
                 took over nodes of this bundle's graph

A bundle passes when the host's self-test passes and every check passes on every CPU. The numbers are
differences of outputs only: emulated timings say nothing about real ARM speed and are not reported.
"""

from __future__ import annotations

import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from armcheck.run import HOST, BundleRun, PlatformRun
from edgepack.selftest import compare

CHECKS = ("ran", "self-test", "host", "xnnpack")
SEGV_HINT = (
    " (XNNPACK crashes so when the guest sees no ARM /proc/cpuinfo: check proc/cpuinfo in the CPU's view, "
    "see docs/arm.md)"
)


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


@dataclass
class CpuVerdict:
    cpu: str
    features: list[str]
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(self.checks.get(name, Check(False, "not run")).ok for name in CHECKS)


@dataclass
class BundleVerdict:
    bundle: Path
    title: str
    host: Check
    cpus: list[CpuVerdict]

    @property
    def ok(self) -> bool:
        return self.host.ok and all(cpu.ok for cpu in self.cpus)

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "title": self.title,
            "ok": self.ok,
            "host": asdict(self.host),
            "cpus": [
                {
                    "cpu": c.cpu,
                    "ok": c.ok,
                    "features": c.features,
                    "checks": {k: asdict(v) for k, v in c.checks.items()},
                }
                for c in self.cpus
            ],
        }


def judge(runs: dict[str, PlatformRun]) -> list[BundleVerdict]:
    """One verdict per bundle, in the order the bundles were given."""
    host = runs[HOST]
    emulated = [run for label, run in runs.items() if label != HOST]
    verdicts = []
    for index, host_bundle in enumerate(host.bundles):
        verdicts.append(
            BundleVerdict(
                bundle=host_bundle.bundle,
                title=_title(host_bundle),
                host=_host_check(host, host_bundle),
                cpus=[_judge_cpu(run, run.bundles[index], host_bundle) for run in emulated],
            )
        )
    return verdicts


def _title(run: BundleRun) -> str:
    meta = (run.result or {}).get("bundle")
    if not meta:
        return run.bundle.name
    return (
        f"{meta['name']} {meta['version']} (target {meta['target']}, {meta['runtime']}, "
        f"atol {meta['atol']:g}, rtol {meta['rtol']:g})"
    )


def _host_check(host: PlatformRun, run: BundleRun) -> Check:
    ran = _ran(host, run)
    if not ran.ok:
        return Check(False, f"the host itself cannot run it: {ran.detail}")
    return _selftest(run.result or {})


def _judge_cpu(platform: PlatformRun, run: BundleRun, host: BundleRun) -> CpuVerdict:
    verdict = CpuVerdict(platform.platform.label, platform.platform.features)
    ran = verdict.checks["ran"] = _ran(platform, run)
    if not ran.ok:
        for name in CHECKS[1:]:
            verdict.checks[name] = Check(False, "not run")
        return verdict
    result = run.result or {}
    verdict.checks["self-test"] = _selftest(result)
    verdict.checks["host"] = _against_host(run, host)
    verdict.checks["xnnpack"] = _xnnpack(platform, result)
    return verdict


def _ran(platform: PlatformRun, run: BundleRun) -> Check:
    if run.result is not None:
        if run.result.get("ok"):
            runtime = run.result["bundle"]["runtime"]
            return Check(True, f"{run.result['machine']}, {runtime} {run.result['runtime_version']}")
        return Check(False, str(run.result.get("error")))
    how = _how_it_ended(platform.returncode)
    where = "while running this bundle" if run.started else "before reaching this bundle"
    hint = SEGV_HINT if platform.returncode == -signal.SIGSEGV else ""
    return Check(False, f"the process {how} {where}{hint}; last lines of {platform.log_file}:\n{platform.log_tail()}")


def _how_it_ended(returncode: int | None) -> str:
    if returncode is None:
        return "was killed after the timeout"
    if returncode < 0:
        try:
            return f"died of {signal.Signals(-returncode).name}"
        except ValueError:
            return f"died of signal {-returncode}"
    return f"exited with status {returncode}"


def _selftest(result: dict[str, Any]) -> Check:
    meta, report = result["bundle"], result["selftest"]
    mismatches = report["mismatches"]
    if mismatches:
        more = f"; {len(mismatches) - 1} more sample/output pair(s) differ" if len(mismatches) > 1 else ""
        return Check(False, f"{mismatches[0]['text']} (atol {meta['atol']:g}, rtol {meta['rtol']:g}){more}")
    worst = max(report["max_abs_diff"].values(), default=0.0)
    return Check(True, f"{result['samples']} sample(s) within tolerance, max |diff| {worst:.3g}")


def _against_host(run: BundleRun, host: BundleRun) -> Check:
    if host.result is None or not host.result.get("ok"):
        return Check(False, "no host outputs to compare with (see the host's error)")
    meta = host.result["bundle"]
    got, want = run.outputs(), host.outputs()
    if set(got) != set(want):
        return Check(False, f"produced {len(got)} sample outputs, the host {len(want)}")
    worst, failures = 0.0, []
    for (sample, name), expected in sorted(want.items(), key=lambda item: item[0]):
        diff, mismatch = compare(sample, name, got[(sample, name)], expected, meta["atol"], meta["rtol"])
        worst = max(worst, diff)
        if mismatch is not None:
            failures.append(mismatch)
    if failures:
        more = f"; {len(failures) - 1} more sample/output pair(s) differ" if len(failures) > 1 else ""
        return Check(False, f"differs from the host's native run: {failures[0]}{more}")
    return Check(True, f"max |diff| {worst:.3g} from the host's native outputs")


def _xnnpack(platform: PlatformRun, result: dict[str, Any]) -> Check:
    if not platform.xnnpack_logged:
        return Check(False, "LiteRT never logged 'Created TensorFlow Lite XNNPACK delegate for CPU' in this process")
    delegation = result.get("delegation") or {}
    if delegation.get("delegate", "unknown") == "unknown":
        return Check(False, "delegate created, but the interpreter's nodes cannot be listed to see what it took")
    if delegation["delegate_nodes"] < 1:
        return Check(False, f"delegate created but it took none of the graph's {delegation['model_ops']} op(s)")
    return Check(
        True, f"delegate created; {delegation['delegate_nodes']} delegate node(s) over {delegation['model_ops']} op(s)"
    )
