"""Fixtures of the ARM proof: the tools it needs, a signing key and trust store, the bundles under test,
and one ``scripts/arm-check`` run over all of them shared by the tests that read its report.

The emulated run costs seconds per CPU whatever the number of bundles, so every bundle goes into a
single run. The rootfs and wheels are cached in ``$EDGEPACK_ARM_CACHE`` (default
``~/.cache/edgepack/arm``); the first run builds that cache (about a minute, network needed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgepack.keys import SigningKey
from edgepack.trust import TrustStore
from tests.arm.models import conv_bundle
from tests.conftest import REPO

ARM_CHECK = REPO / "scripts" / "arm-check"
SAMPLE_MODEL = REPO / "models" / "digits_cnn.onnx"
TOOLS = {"qemu-aarch64-static": "qemu-user-static", "mmdebstrap": "mmdebstrap"}

sys.path.append(str(REPO / "scripts"))  # the armcheck package (scripts/armcheck), for the unit tests


def missing_tools() -> str | None:
    """Why the emulated tests cannot run here, or None."""
    missing = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        return f"the ARM proof needs Debian packages that are not installed: apt-get install {' '.join(missing)}"
    return None


@dataclass
class Signing:
    key: SigningKey
    key_file: Path
    trust: Path


@pytest.fixture(scope="session")
def arm_signing(tmp_path_factory: pytest.TempPathFactory) -> Signing:
    root = tmp_path_factory.mktemp("arm-signing")
    key = SigningKey.generate()
    key.save(root / "keys", "ci")
    TrustStore.init(root / "trust", [root / "keys" / "ci.pub"])
    return Signing(key, root / "keys" / "ci.key", root / "trust")


@dataclass
class Rpi4Bundle:
    path: Path | None
    reason: str = ""


@pytest.fixture(scope="session")
def rpi4_bundle(tmp_path_factory: pytest.TempPathFactory, arm_signing: Signing) -> Rpi4Bundle:
    """The sample digits CNN compiled for rpi4 (int8) by the real compiler (onnx2tf toolchain + ai-edge-quantizer)."""
    from edgepack.compiler.pipeline import CompileRequest, compile_model
    from tests.compiler.conftest import _digits_module

    out = tmp_path_factory.mktemp("arm-rpi4")
    data = _digits_module().write_npz(out / "digits")
    request = CompileRequest(
        model=SAMPLE_MODEL,
        target="rpi4",
        precision="int8",
        calibration=data["calibration"],  # no validation set: arm-check needs the bundle, not its accuracy
        keys=[arm_signing.key_file],
        output=out / "digits-rpi4.epk",
        name="digits-rpi4",
        version="1.0.0",
    )
    result = compile_model(request)  # a compile failure fails the ARM tests that need it
    return Rpi4Bundle(result.output)


@dataclass
class ArmRun:
    """One arm-check run: its exit status, what it printed, and the JSON report by bundle name."""

    returncode: int
    stdout: str
    stderr: str
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def verdict(self, name: str) -> dict[str, Any]:
        assert name in self.verdicts, f"no verdict for {name}; arm-check said:\n{self.stdout}\n{self.stderr}"
        return self.verdicts[name]


@pytest.fixture(scope="session")
def arm_run(tmp_path_factory: pytest.TempPathFactory, arm_signing: Signing, rpi4_bundle: Rpi4Bundle) -> ArmRun:
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("ai_edge_litert", reason="install edgepack[agent-litert]: the host run is the reference")
    root = tmp_path_factory.mktemp("arm")
    bundles = {
        "conv-float": conv_bundle(root, arm_signing.key, name="conv-float"),
        "conv-int8": conv_bundle(root, arm_signing.key, name="conv-int8", quantized=True, target="rpi4"),
        "conv-altered": conv_bundle(root, arm_signing.key, name="conv-altered", alter=(2, 3, 0.5)),
    }
    if rpi4_bundle.path is not None:
        bundles["digits-rpi4"] = rpi4_bundle.path
    report = root / "report.json"
    done = subprocess.run(
        [str(ARM_CHECK), *map(str, bundles.values()), "--trust", str(arm_signing.trust), "--report", str(report)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=900,
    )
    run = ArmRun(done.returncode, done.stdout, done.stderr)
    if report.is_file():
        for verdict in json.loads(report.read_text())["bundles"]:
            run.verdicts[verdict["title"].split()[0]] = verdict
    return run
