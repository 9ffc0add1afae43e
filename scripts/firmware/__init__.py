"""``scripts/build-image``: an OCI image archive of a device class's firmware, built where registries are out of reach.

One device class is one folder in ``firmware-images/`` (Containerfile, systemd unit, ``agent.toml``,
``image.env``); ``firmware-images/common/install-agent.sh`` is the one recipe that puts the agent into a
root file system, run by the Containerfile and by this builder alike. The steps, one module each::

    classes.py   a device class as its image.env declares it (runtime extra, Debian suite/arch/packages)
    wheels.py    the edgepack wheel built from this tree, and every dependency as a binary wheel for the
                 class's Python and architecture (pip download --platform), cached
    context.py   the build context: image.env, install-agent.sh, class files, wheels/, trust/, identity/,
                 factory/ — what the Containerfile's RUN mounts and what the chroot install reads
    rootfs.py    the Debian base (mmdebstrap, cached as a tarball; arm64 through qemu-user-static), unpacked
                 per build, install-agent.sh run in it under chroot, packed as the image's one layer
    oci.py       the layer committed into an OCI archive with buildah (vfs storage, no container runtime),
                 the image config set to what the Containerfile says; skopeo inspects the result
    cli.py       the command line, the cache lock, rich progress for the long steps

Usage (the scripts/ folder on ``sys.path``)::

    from firmware.cli import build, default_cache
    result = build("generic-x86", trust=Path("trust"), output=Path("generic-x86.tar"),
                   factory=[Path("digits.epk")], cache=default_cache())
"""

from __future__ import annotations


class FirmwareError(Exception):
    """A build that cannot go on; the message says what was wrong and what to do."""
