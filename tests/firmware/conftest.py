"""Fixtures for the firmware tests: the scripts/firmware package on sys.path, signing for images."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgepack.keys import SigningKey
from edgepack.trust import TrustStore

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "firmware-images"
CLASSES = ("generic-x86", "intel-x86", "rpi4-arm64", "jetson-orin")
sys.path.append(str(REPO / "scripts"))  # the firmware package (scripts/firmware)

IMAGE_TOOLS = ("mmdebstrap", "buildah", "skopeo", "umoci", "chroot", "unshare", "systemd-analyze")


def missing_image_tools() -> str | None:
    """Why an image cannot be built and run here, or None."""
    if os.geteuid() != 0:
        return "building an image needs root (mmdebstrap root mode, chroot); run the tests as root"
    missing = [tool for tool in IMAGE_TOOLS if shutil.which(tool) is None]
    if missing:
        return (
            f"missing {', '.join(missing)}: apt-get install mmdebstrap buildah skopeo umoci systemd (scripts/test does)"
        )
    return None


@dataclass
class FleetKeys:
    key: SigningKey
    trust: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetKeys:
    directory = tmp_path_factory.mktemp("fleet")
    key = SigningKey.generate()
    key.save(directory / "keys", "release")
    TrustStore.init(directory / "trust", [directory / "keys" / "release.pub"])
    return FleetKeys(key, directory / "trust")
