"""An OCI image archive from the root file system layer, with buildah; checked with skopeo.

buildah builds from ``scratch`` with its ``vfs`` storage driver in the build's work folder (no overlay
mounts, no daemon, no container runtime: it works as root inside a sandbox), adds the layer, sets the image
config and commits straight to ``oci-archive:IMAGE.tar:edgepack/<class>:<version>`` (gzip-compressed
layer). Nothing is ever RUN in a container, so no isolation is needed; a Containerfile build
(``--builder containerfile``) runs ``buildah bud --isolation chroot`` for the sandboxes that forbid others.

The config is the Containerfiles' (ENTRYPOINT, USER, VOLUME, EXPOSE; a test keeps them in step): in a
container the agent runs directly as ``edgepack``; on a device systemd starts the unit instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

from firmware import FirmwareError, proc
from firmware.classes import ARCHES, DeviceClass

log = logging.getLogger(__name__)

ENTRYPOINT = ["/opt/edgepack/bin/edgepack", "agent", "run", "--config", "/etc/edgepack/agent.toml"]
USER = "edgepack"
VOLUME = "/var/lib/edgepack"
PORT = "8000"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FirmwareError(f"{name} is not installed: apt-get install buildah skopeo")
    return path


def _storage(work: Path) -> list[str]:
    return [
        "--root",
        str(work / "buildah" / "storage"),
        "--runroot",
        str(work / "buildah" / "run"),
        "--storage-driver",
        "vfs",
    ]


def commit(
    layer: Path, output: Path, klass: DeviceClass, tag: str, labels: dict[str, str], work: Path, on_line: proc.LineHook
) -> None:
    """Write ``output`` (an oci-archive) holding ``layer`` as the image ``tag``."""
    buildah = [_tool("buildah"), *_storage(work)]
    arch, variant, _ = ARCHES[klass.arch]
    container = f"edgepack-build-{klass.name}-{os.getpid()}"
    proc.run([*buildah, "from", "--name", container, "scratch"], what="buildah from scratch", on_line=on_line)
    try:
        proc.run([*buildah, "add", container, layer, "/"], what="buildah add (the root file system)", on_line=on_line)
        config = [
            "--entrypoint",
            json.dumps(ENTRYPOINT),
            "--cmd",
            "",
            "--user",
            USER,
            "--volume",
            VOLUME,
            "--port",
            PORT,
            "--env",
            "PYTHONUNBUFFERED=1",
            "--os",
            "linux",
            "--arch",
            arch,
        ]
        if variant:
            config += ["--variant", variant]
        for key, value in labels.items():
            config += ["--label", f"{key}={value}"]
        proc.run([*buildah, "config", *config, container], what="buildah config", on_line=on_line)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.unlink(missing_ok=True)
        proc.run(
            [
                *buildah,
                "commit",
                "--format",
                "oci",
                "--disable-compression=false",
                "--quiet",
                container,
                f"oci-archive:{output}:{tag}",
            ],
            what="buildah commit (the OCI archive)",
            on_line=on_line,
        )
    finally:
        proc.run([*buildah, "rm", container], what="buildah rm")
        shutil.rmtree(work / "buildah", ignore_errors=True)


def build_containerfile(
    context: Path, output: Path, klass: DeviceClass, tag: str, work: Path, on_line: proc.LineHook
) -> None:
    """``buildah bud`` of the class's Containerfile (pulls its base image: needs registry access)."""
    buildah = [_tool("buildah"), *_storage(work)]
    arch, variant, _ = ARCHES.get(klass.settings.get("DEBIAN_ARCH", "arm64"), ARCHES["arm64"])
    platform = f"linux/{arch}" + (f"/{variant}" if variant else "")
    try:
        proc.run(
            [
                *buildah,
                "bud",
                "--isolation",
                "chroot",
                "--platform",
                platform,
                "--layers=false",
                "-f",
                context / "Containerfile",
                "-t",
                tag,
                context,
            ],
            what=f"buildah bud of {klass.name}'s Containerfile (can this host pull its base image?)",
            on_line=on_line,
        )
        output.unlink(missing_ok=True)
        proc.run(
            [*buildah, "push", tag, f"oci-archive:{output}:{tag}"],
            what="buildah push (the OCI archive)",
            on_line=on_line,
        )
    finally:
        shutil.rmtree(work / "buildah", ignore_errors=True)


def inspect(archive: Path) -> dict:
    """``skopeo inspect`` of the archive's image and of its config, as JSON (FirmwareError when invalid)."""
    skopeo = _tool("skopeo")
    found = {}
    for key, extra in (("image", []), ("config", ["--config"])):
        done = subprocess.run([skopeo, "inspect", *extra, f"oci-archive:{archive}"], capture_output=True, text=True)
        if done.returncode != 0:
            raise FirmwareError(f"skopeo inspect {' '.join(extra)} oci-archive:{archive} failed: {done.stderr.strip()}")
        try:
            found[key] = json.loads(done.stdout)
        except json.JSONDecodeError as exc:
            raise FirmwareError(f"skopeo inspect gave no JSON for {archive}: {exc}") from exc
    return found
