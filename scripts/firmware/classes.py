"""A device class: its folder in ``firmware-images/`` and the settings its ``image.env`` declares.

``image.env`` is shell (``KEY="value"`` lines) because ``install-agent.sh`` and the Containerfile source it;
this module reads the same lines, so every setting is written once. A class without ``DEBIAN_SUITE`` (the
Jetson: an NVIDIA L4T base) can be built from its Containerfile only.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from firmware import FirmwareError

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "firmware-images"
COMMON = IMAGES / "common"
CLASS_FILES = ("Containerfile", "edgepack-agent.service", "agent.toml", "image.env")
_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")
# Debian architecture -> (OCI architecture, OCI variant, the machine name in wheel tags)
ARCHES = {"amd64": ("amd64", None, "x86_64"), "arm64": ("arm64", "v8", "aarch64")}


@dataclass(frozen=True)
class DeviceClass:
    name: str
    folder: Path
    settings: dict[str, str]

    @property
    def requirement(self) -> str:
        return self.settings["REQUIREMENT"]

    @property
    def debian(self) -> bool:
        """Whether this builder can make the class's root file system from Debian."""
        return bool(self.settings.get("DEBIAN_SUITE"))

    @property
    def suite(self) -> str:
        return self.settings["DEBIAN_SUITE"]

    @property
    def arch(self) -> str:
        return self.settings["DEBIAN_ARCH"]

    @property
    def packages(self) -> list[str]:
        return self.settings.get("DEBIAN_PACKAGES", "").split()


def class_names() -> list[str]:
    return sorted(p.name for p in IMAGES.iterdir() if (p / "image.env").is_file())


def load_class(name: str) -> DeviceClass:
    folder = IMAGES / name
    if not (folder / "image.env").is_file():
        raise FirmwareError(f"no device class {name!r} in {IMAGES}; the classes are: {', '.join(class_names())}")
    missing = [f for f in CLASS_FILES if not (folder / f).is_file()]
    if missing:
        raise FirmwareError(f"device class {name} lacks {', '.join(missing)} in {folder}")
    settings = read_env(folder / "image.env")
    if "REQUIREMENT" not in settings:
        raise FirmwareError(f"{folder / 'image.env'} must set REQUIREMENT (the agent with its runtime extra)")
    klass = DeviceClass(name, folder, settings)
    if klass.debian and klass.arch not in ARCHES:
        raise FirmwareError(f"{name}: DEBIAN_ARCH={klass.arch!r} is not one of {', '.join(ARCHES)}")
    return klass


def read_env(path: Path) -> dict[str, str]:
    """``KEY="value"`` lines (comments and blank lines skipped), unquoted the way sh would."""
    settings = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise FirmwareError(f'{path}:{number}: expected KEY="value", got {raw!r}')
        words = shlex.split(match.group(2), comments=True)
        settings[match.group(1)] = " ".join(words)
    return settings
