"""``scripts/build-image``: the command line, the order of the steps, progress and the result.

    scripts/build-image --class CLASS --trust DIR -o IMAGE.tar [--factory-bundle B.epk]…
                        [--device-cert PEM --device-key KEY] [--ca PEM] [--config agent.toml] [--device-id ID]
                        [--builder debian|containerfile] [--context-only DIR] [--rootfs-out ROOTFS.tar]
                        [--cache DIR] [--keep-work] [-v]

Exit status 0 when the archive is written and validates, 2 when the build cannot go on (the message says
why and what to do). The build log (every tool's output) is ``<cache>/logs/<class>.log``.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from firmware import FirmwareError, oci, rootfs, wheels
from firmware.classes import REPO, class_names, load_class
from firmware.context import ContextSpec, Identity, write_context

log = logging.getLogger("firmware")


def default_cache() -> Path:
    """``$EDGEPACK_FIRMWARE_CACHE``, else ``.cache/firmware`` in the repository (gitignored)."""
    return Path(os.environ.get("EDGEPACK_FIRMWARE_CACHE") or REPO / ".cache" / "firmware")


@dataclass
class BuildResult:
    output: Path
    tag: str
    size_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    inspect: dict = field(default_factory=dict)


class Steps:
    """One progress line per step, with the tool's latest output line beside it and the time taken."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._task = None
        self._title = ""

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self._title = title
        started = time.monotonic()
        if self.progress is not None:
            self._task = self.progress.add_task(title, total=None)
        try:
            yield
        finally:
            self.seconds[title] = round(time.monotonic() - started, 1)
            if self.progress is not None and self._task is not None:
                self.progress.update(
                    self._task, description=f"{title} [dim]({self.seconds[title]} s)[/]", total=1, completed=1
                )
            log.info("%s: %.1f s", title, self.seconds[title])

    def line(self, text: str) -> None:
        if self.progress is not None and self._task is not None:
            self.progress.update(self._task, description=f"{self._title} [dim]{text[:70]}[/]")


def build(
    class_name: str,
    *,
    trust: Path,
    output: Path | None,
    factory: list[Path] | None = None,
    identity: Identity | None = None,
    config: Path | None = None,
    device_id: str | None = None,
    builder: str = "debian",
    context_only: Path | None = None,
    rootfs_out: Path | None = None,
    cache: Path | None = None,
    keep_work: bool = False,
    progress: Progress | None = None,
) -> BuildResult | None:
    """Build ``class_name``'s image into ``output`` (None with ``context_only``: only write the context)."""
    klass = load_class(class_name)
    cache = cache or default_cache()
    spec = ContextSpec(
        trust=trust, identity=identity or Identity(), factory=list(factory or []), config=config, device_id=device_id
    )
    if builder == "debian" and not klass.debian and context_only is None:
        raise FirmwareError(
            f"{class_name} is not built from Debian here ({klass.folder / 'image.env'} sets no DEBIAN_SUITE: its "
            f"base is {klass.settings.get('L4T_BASE', 'a vendor image')}); use --builder containerfile on a host that "
            "can pull that base, or --context-only DIR to prepare the build context"
        )
    version = metadata.version("edgepack")
    tag = f"edgepack/{class_name}:{version}"
    steps = Steps(progress)
    with _locked(cache), _work_dir(cache, class_name, keep_work) as work:
        python = sys.executable
        with steps.step("wheels: edgepack from this tree, dependencies (cache, else PyPI)"):
            if klass.debian:
                found = wheels.ensure_wheels(cache, klass, work, python, steps.line)
                wheel_files = found.files
            else:  # the Jetson's packages come from NVIDIA's index at build time; only pip and edgepack here
                edgepack = wheels.build_edgepack_wheel(work / "edgepack-wheel")
                wheel_files = [edgepack, *_pip_wheel(cache, work, steps)]
        with steps.step("build context"):
            context = write_context(klass, spec, wheel_files, context_only or work / "context")
        if context_only is not None:
            log.info("build context for %s written to %s", class_name, context)
            return None
        assert output is not None
        if builder == "containerfile":
            with steps.step(f"buildah bud {klass.folder.name}/Containerfile"):
                oci.build_containerfile(context, output, klass, tag, work, steps.line)
        else:
            with steps.step(f"Debian base ({klass.suite} {klass.arch}, mmdebstrap; cached)"):
                base = rootfs.ensure_base(cache, klass, steps.line)
            with steps.step("install the agent (chroot)"):
                root = rootfs.build_root(base, context, work, steps.line)
            with steps.step("pack the root file system"):
                layer = rootfs.pack_layer(root, work / "rootfs.tar", steps.line)
                shutil.rmtree(root, ignore_errors=True)
            with steps.step("commit the OCI archive (buildah)"):
                labels = {
                    "org.opencontainers.image.title": f"edgepack-agent-{class_name}",
                    "org.opencontainers.image.version": version,
                    "org.opencontainers.image.description": f"edgepack device agent for {class_name}",
                    "io.edgepack.class": class_name,
                    "io.edgepack.requirement": klass.requirement,
                }
                oci.commit(layer, output, klass, tag, labels, work, steps.line)
            if rootfs_out is not None:
                rootfs_out.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(layer), rootfs_out)
        with steps.step("validate (skopeo inspect)"):
            found = oci.inspect(output)
    return BuildResult(output, tag, output.stat().st_size, steps.seconds, found)


def _pip_wheel(cache: Path, work: Path, steps: Steps) -> list[Path]:
    folder = cache / "wheels" / "any"
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("pip-*.whl"))
    if existing:
        return existing[-1:]
    from firmware import proc

    proc.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", folder, "pip"],
        what="downloading the pip wheel",
        on_line=steps.line,
    )
    return sorted(folder.glob("pip-*.whl"))[-1:]


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One build at a time per cache (a test and a manual build would otherwise share half-written files)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@contextmanager
def _work_dir(cache: Path, class_name: str, keep: bool) -> Iterator[Path]:
    work = cache / "work" / f"{class_name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        if keep:
            log.info("work folder kept: %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/build-image", description=__doc__.split("\n\n")[0])
    p.add_argument("--class", dest="klass", required=True, choices=class_names(), help="the device class")
    p.add_argument("--trust", type=Path, required=True, help="the fleet trust root (a trust store folder)")
    p.add_argument("-o", "--output", type=Path, help="the OCI image archive to write (IMAGE.tar)")
    p.add_argument(
        "--factory-bundle",
        type=Path,
        action="append",
        default=[],
        help="a bundle the device installs at first boot (repeatable)",
    )
    p.add_argument("--device-cert", type=Path, help="the device's certificate for the broker (PEM)")
    p.add_argument("--device-key", type=Path, help="its private key (PEM; readable by the agent's group only)")
    p.add_argument("--ca", type=Path, help="the broker's CA certificate (PEM)")
    p.add_argument("--config", type=Path, help="an agent.toml replacing the class's default")
    p.add_argument("--device-id", help="set device_id in agent.toml")
    p.add_argument(
        "--builder",
        choices=("debian", "containerfile"),
        default="debian",
        help="debian: mmdebstrap + chroot here, no registry (default); containerfile: buildah bud",
    )
    p.add_argument("--context-only", type=Path, metavar="DIR", help="only write the Containerfile's build context")
    p.add_argument("--rootfs-out", type=Path, metavar="ROOTFS.tar", help="also keep the root file system as a tar")
    p.add_argument("--cache", type=Path, default=None, help=f"cache folder (default {default_cache()})")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (for debugging)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.output is None and args.context_only is None:
        _parser().error("give -o IMAGE.tar (or --context-only DIR)")
    console = Console(stderr=True)
    cache = args.cache or default_cache()
    (cache / "logs").mkdir(parents=True, exist_ok=True)
    logfile = cache / "logs" / f"{args.klass}.log"
    handler = logging.FileHandler(logfile, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG, handlers=[handler])
    started = time.monotonic()
    try:
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=not console.is_terminal and not args.verbose,
        ) as progress:
            result = build(
                args.klass,
                trust=args.trust,
                output=args.output,
                factory=args.factory_bundle,
                identity=Identity(cert=args.device_cert, key=args.device_key, ca=args.ca),
                config=args.config,
                device_id=args.device_id,
                builder=args.builder,
                context_only=args.context_only,
                rootfs_out=args.rootfs_out,
                cache=cache,
                keep_work=args.keep_work,
                progress=progress,
            )
    except FirmwareError as exc:
        console.print(f"[red]build-image:[/] {exc}\n(build log: {logfile})", highlight=False)
        return 2
    if result is None:
        console.print(f"build context written to {args.context_only}")
        return 0
    layers = result.inspect["image"].get("Layers", [])
    console.print(
        f"{result.output}: {result.tag}, {result.size_bytes / 1e6:.1f} MB, {len(layers)} layer(s), "
        f"{result.inspect['image'].get('Architecture')}; built in {time.monotonic() - started:.0f} s "
        f"(log: {logfile})",
        highlight=False,
    )
    return 0
