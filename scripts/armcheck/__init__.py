"""ARM proof for LiteRT bundles: run them on the aarch64 runtime under user-mode emulation, on an x86 host.

``scripts/arm-check BUNDLE… --trust DIR`` answers one question per bundle and emulated CPU: does the
bundle, verified, loaded and self-tested by edgepack's own code on the aarch64 build of LiteRT (with the
XNNPACK delegate really in use), give the outputs the bundle promises and the host computes natively?
It reports correctness only: emulated timings say nothing about the speed of a real ARM chip.

The steps, one module each::

    rootfs.py   a minimal Debian arm64 root file system (mmdebstrap --variant=extract: nothing emulated),
                cached; per emulated CPU a view of it with an ARM /proc/cpuinfo (cpus.py)
    wheels.py   aarch64 wheels of edgepack[agent-litert]'s dependencies, pinned to the host's versions,
                and the edgepack wheel built from this tree, installed on the host with pip --platform
    run.py      guest.py run by the rootfs Python through qemu-aarch64-static -cpu MODEL (one process per
                CPU, all bundles), and natively by the host's Python for the reference
    compare.py  per bundle and CPU: self-test against the bundle's vectors, agreement with the host,
                XNNPACK proof, into a verdict
    cli.py      arguments, the cache lock, the report

Usage (the scripts/ folder on ``sys.path``)::

    from armcheck.cli import check, default_cache
    verdicts = check([Path("digits.epk")], trust=Path("trust"), cache=default_cache(),
                     cpu_names=["cortex-a53", "neoverse-n1"], work=Path("arm-work"))
    assert all(v.ok for v in verdicts), [v.to_json() for v in verdicts]
"""

from __future__ import annotations


class ArmCheckError(Exception):
    """Something arm-check needs is missing or failed; the message says what to do."""
