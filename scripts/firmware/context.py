"""The build context of a device image: everything ``install-agent.sh`` reads, in one folder.

    CTX/image.env  install-agent.sh  edgepack.sysusers     the recipe (firmware-images/<class>, common/)
    CTX/Containerfile  edgepack-agent.service  agent.toml  the class's files (agent.toml possibly replaced)
    CTX/wheels/    the edgepack wheel and every dependency, hard-linked from the cache where possible
    CTX/trust/     the fleet trust root (a directory `edgepack trust init` made; checked here)
    CTX/identity/  device.pem, device.key, ca.pem (each optional)
    CTX/factory/   *.epk, installed by the agent at first boot (verified here against the trust root)

The same folder is the Containerfile's build context (``--context-only``) and, copied into the root file
system, what the chroot install reads.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.agent.config import load_config
from edgepack.bundle import read_info, verify_bundle
from edgepack.errors import EdgepackError
from edgepack.trust import TrustStore
from firmware import FirmwareError
from firmware.classes import CLASS_FILES, COMMON, DeviceClass

log = logging.getLogger(__name__)

_DEVICE_ID = re.compile(r'^device_id = ".*"$', re.MULTILINE)


@dataclass
class Identity:
    """What makes one device itself: its certificate and key for the broker, and the broker's CA."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def files(self) -> dict[str, Path]:
        named = {"device.pem": self.cert, "device.key": self.key, "ca.pem": self.ca}
        return {name: path for name, path in named.items() if path is not None}


@dataclass
class ContextSpec:
    trust: Path
    identity: Identity = field(default_factory=Identity)
    factory: list[Path] = field(default_factory=list)
    config: Path | None = None  # replaces the class's agent.toml
    device_id: str | None = None


def write_context(klass: DeviceClass, spec: ContextSpec, wheels: list[Path], dest: Path) -> Path:
    """Fill ``dest`` (created) with the build context; returns it."""
    _check_inputs(klass, spec)
    dest.mkdir(parents=True, exist_ok=True)
    for name in CLASS_FILES:
        shutil.copy2(klass.folder / name, dest / name)
    for name in ("install-agent.sh", "edgepack.sysusers"):
        shutil.copy2(COMMON / name, dest / name)
    if spec.config is not None:
        shutil.copy2(spec.config, dest / "agent.toml")
    if spec.device_id is not None:
        text = (dest / "agent.toml").read_text()
        text, count = _DEVICE_ID.subn(f'device_id = "{spec.device_id}"', text, count=1)
        if count != 1:
            raise FirmwareError("--device-id needs a 'device_id = \"…\"' line in agent.toml to set")
        (dest / "agent.toml").write_text(text)
    _link_all(wheels, dest / "wheels")
    shutil.copytree(spec.trust, dest / "trust", dirs_exist_ok=True)
    (dest / "identity").mkdir(exist_ok=True)
    for name, path in spec.identity.files().items():
        shutil.copy2(path, dest / "identity" / name)
    (dest / "factory").mkdir(exist_ok=True)
    _check_targets(spec.factory, dest / "agent.toml")
    for bundle in spec.factory:
        shutil.copy2(bundle, dest / "factory" / bundle.name)
    return dest


def _check_targets(bundles: list[Path], config: Path) -> None:
    """A factory bundle for a target the image's agent.toml refuses would never install: say so now."""
    try:
        targets = load_config(config).targets
    except EdgepackError as exc:
        raise FirmwareError(f"the image's agent.toml is invalid: {exc}") from exc
    for bundle in bundles:
        target = read_info(bundle).manifest.target
        if targets is not None and target not in targets:
            raise FirmwareError(
                f"factory bundle {bundle.name} is built for target {target!r}, but the image's agent.toml accepts "
                f"{', '.join(targets)}: the device would refuse it (compile for one of those, or pass --config)"
            )


def _check_inputs(klass: DeviceClass, spec: ContextSpec) -> None:
    try:
        trust = TrustStore.load(spec.trust)
    except EdgepackError as exc:
        raise FirmwareError(f"--trust {spec.trust}: {exc}") from exc
    if bool(spec.identity.cert) != bool(spec.identity.key):
        raise FirmwareError("--device-cert and --device-key go together (the broker needs both)")
    for path in [*spec.identity.files().values(), *spec.factory, *([spec.config] if spec.config else [])]:
        if not path.is_file():
            raise FirmwareError(f"{path} does not exist or is not a file")
    names = [b.name for b in spec.factory]
    if len(set(names)) != len(names):
        raise FirmwareError(f"factory bundles must have different file names: {names}")
    for bundle in spec.factory:
        if bundle.suffix != ".epk":
            raise FirmwareError(f"factory bundle {bundle} must end in .epk (the agent installs *.epk)")
        try:
            manifest = verify_bundle(bundle, trust)
        except EdgepackError as exc:
            raise FirmwareError(
                f"factory bundle {bundle.name} does not verify against --trust {spec.trust}: {exc} "
                "(the device would refuse it at first boot)"
            ) from exc
        log.info(
            "factory bundle %s: %s %s for target %s", bundle.name, manifest.name, manifest.version, manifest.target
        )


def _link_all(files: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for path in files:
        target = dest / path.name
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
