"""``scripts/arm-check``: the command line, the order of the steps, and the printed report.

    scripts/arm-check BUNDLE… --trust DIR [--cache DIR] [--cpus cortex-a53,neoverse-n1]
                      [--report FILE.json] [--work DIR] [--timeout S] [-v]

Exit status: 0 every bundle passed on every CPU, 1 some check failed, 2 arm-check could not run (a tool
missing, a download failing, a bundle it cannot check); the message says what to do.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from armcheck import ArmCheckError, cpus, rootfs, run, wheels
from armcheck.compare import BundleVerdict, judge

log = logging.getLogger("armcheck")

REPO = Path(__file__).resolve().parents[2]
ARM_TARGETS = ("arm64", "rpi4", "rpi5")
NOTE = "correctness only: emulated timings say nothing about real ARM speed, so none are reported"


def default_cache() -> Path:
    if "EDGEPACK_ARM_CACHE" in os.environ:
        return Path(os.environ["EDGEPACK_ARM_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgepack" / "arm"


def check(
    bundles: Sequence[Path],
    *,
    trust: Path,
    cache: Path,
    cpu_names: Sequence[str] = cpus.DEFAULT_CPUS,
    work: Path,
    timeout: float = 600.0,
) -> list[BundleVerdict]:
    """Prepare (or reuse) the cache, run every bundle on the host and on each CPU, and judge them."""
    for name in cpu_names:
        cpus.model(name)  # unknown names fail before anything is built
    _check_bundles(bundles, trust)
    emulator = cpus.Emulator.find()
    started = time.monotonic()
    with _locked(cache):
        tree = rootfs.ensure_rootfs(cache)
        site = wheels.ensure_site(cache, REPO, tree.python_version, tree.glibc)
        views = [rootfs.cpu_view(tree, cache, name, emulator) for name in cpu_names]
    log.info("cache ready in %.1f s (%s, qemu %s)", time.monotonic() - started, cache, emulator.version)
    platforms = [run.host_platform()] + [run.emulated_platform(emulator, v, site.paths, work) for v in views]
    runs = run.run_all(platforms, list(bundles), trust, work, threads=1, timeout=timeout)
    return judge(runs)


def _check_bundles(bundles: Sequence[Path], trust: Path) -> None:
    """Verify every bundle on the host first: a bad signature or trust store fails here, once, not per CPU."""
    from edgepack.bundle import verify_bundle
    from edgepack.errors import EdgepackError
    from edgepack.trust import TrustStore

    try:
        store = TrustStore.load(trust)
    except EdgepackError as exc:
        raise ArmCheckError(str(exc)) from exc
    for path in bundles:
        try:
            manifest = verify_bundle(path, store)
        except (OSError, EdgepackError) as exc:
            raise ArmCheckError(f"bundle {path} does not verify against {trust}: {exc}") from exc
        if manifest.selftest is None:
            raise ArmCheckError(
                f"{path} carries no self-test vectors, so there is nothing to compare; bundles made by "
                "'edgepack compile' carry them ('edgepack bundle create' adds none)"
            )
        if manifest.runtime.name != "litert":
            raise ArmCheckError(
                f"{path} runs on {manifest.runtime.name}; arm-check checks LiteRT bundles (targets {', '.join(ARM_TARGETS)})"
            )
        if manifest.target not in ARM_TARGETS:
            log.warning(
                "%s is built for target %r, not an ARM target (%s); checking it anyway",
                path,
                manifest.target,
                ", ".join(ARM_TARGETS),
            )


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One arm-check at a time builds or updates the cache."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _print_report(verdicts: list[BundleVerdict]) -> None:
    print(f"arm-check: {NOTE}")
    for verdict in verdicts:
        print(f"\n{'PASS' if verdict.ok else 'FAIL'}  {verdict.title}\n      {verdict.bundle}")
        print(f"  {'host':<12} {_mark(verdict.host.ok)} {'self-test:':<11} {verdict.host.detail}")
        for cpu in verdict.cpus:
            print(f"  {cpu.cpu:<12}      {'hwcaps:':<11} {' '.join(cpu.features)}")
            for name, result in cpu.checks.items():
                detail = result.detail.replace("\n", "\n" + " " * 32)
                print(f"  {'':<12} {_mark(result.ok)} {name + ':':<11} {detail}")
    if verdicts:
        passed = sum(v.ok for v in verdicts)
        print(f"\n{passed} of {len(verdicts)} bundle(s) passed on {', '.join(c.cpu for c in verdicts[0].cpus)}")


def _mark(ok: bool) -> str:
    return "ok  " if ok else "FAIL"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="arm-check",
        description="Run LiteRT bundles on the aarch64 runtime under qemu-user, on emulated ARM CPUs, and compare "
        f"with the host. {NOTE}.",
    )
    parser.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE", help="LiteRT bundles (.epk) to check")
    parser.add_argument("--trust", type=Path, required=True, help="trust store the bundles must verify against")
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="where the arm64 rootfs and wheels are kept between runs "
        "(default: $EDGEPACK_ARM_CACHE or ~/.cache/edgepack/arm)",
    )
    parser.add_argument(
        "--cpus",
        default=",".join(cpus.DEFAULT_CPUS),
        help=f"comma-separated qemu CPU models (default %(default)s; known: {', '.join(cpus.MODELS)})",
    )
    parser.add_argument("--report", type=Path, help="also write the verdicts as JSON here")
    parser.add_argument(
        "--work", type=Path, help="keep logs and outputs here (default: a temporary folder, kept on failure)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for all runs (default %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="arm-check: %(message)s")

    work = args.work or Path(tempfile.mkdtemp(prefix="arm-check-"))
    if args.work:
        if work.exists() and any(work.iterdir()):
            print(f"arm-check: --work {work} must be empty or absent", file=sys.stderr)
            return 2
        work.mkdir(parents=True, exist_ok=True)
    try:
        verdicts = check(
            args.bundles,
            trust=args.trust,
            cache=(args.cache or default_cache()).resolve(),
            cpu_names=[c.strip() for c in args.cpus.split(",") if c.strip()],
            work=work.resolve(),
            timeout=args.timeout,
        )
    except ArmCheckError as exc:
        print(f"arm-check: {exc}", file=sys.stderr)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        return 2
    _print_report(verdicts)
    if args.report:
        args.report.write_text(json.dumps({"note": NOTE, "bundles": [v.to_json() for v in verdicts]}, indent=1))
    ok = all(v.ok for v in verdicts)
    if args.work is None:
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"\nlogs and outputs kept in {work}")
    return 0 if ok else 1
