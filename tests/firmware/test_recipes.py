"""The device-class recipes without building: units verify, settings parse, the Containerfiles agree with the builder."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from firmware import FirmwareError
from firmware.classes import load_class, read_env
from firmware.context import ContextSpec, write_context
from firmware.oci import ENTRYPOINT, PORT, USER, VOLUME

from edgepack.agent.config import load_config
from tests.firmware.conftest import CLASSES, IMAGES
from tests.models import linear_bundle

HOST_UNITS = Path("/usr/lib/systemd/system")


def verify_root(tmp_path: Path, unit: Path) -> Path:
    """A root for ``systemd-analyze verify --root``: the host's unit files (copies: its symlinks are absolute),
    the unit under test in /usr/lib/systemd/system, and a stand-in for the ExecStart program."""
    root = tmp_path / "root"
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    for path in HOST_UNITS.iterdir():
        if path.is_file():  # follows symlinks; the .wants/ folders are left out
            shutil.copy(path, units / path.name)
    shutil.copy(unit, units / unit.name)
    program = root / "opt/edgepack/bin/edgepack"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    return root


def systemd_analyze_verify(root: Path, unit: str = "edgepack-agent.service") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", unit], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("klass", CLASSES)
def test_unit_passes_systemd_analyze_verify_without_warnings(klass, tmp_path):
    if shutil.which("systemd-analyze") is None or not (HOST_UNITS / "sysinit.target").is_file():
        pytest.skip(
            "systemd-analyze and systemd's units are not installed: apt-get install systemd (scripts/test does)"
        )
    done = systemd_analyze_verify(verify_root(tmp_path, IMAGES / klass / "edgepack-agent.service"))
    assert (done.returncode, done.stdout + done.stderr) == (0, ""), "systemd-analyze verify: warnings are failures"


def test_verify_catches_a_bad_unit(tmp_path):
    """The check above can fail: an unknown key only warns (exit 0), and that warning fails the test."""
    if shutil.which("systemd-analyze") is None or not (HOST_UNITS / "sysinit.target").is_file():
        pytest.skip("systemd-analyze and systemd's units are not installed: apt-get install systemd")
    bad = tmp_path / "edgepack-agent.service"
    bad.write_text(
        (IMAGES / "generic-x86/edgepack-agent.service")
        .read_text()
        .replace("PrivateTmp=yes", "PrivateTmp=yes\nProtectEverything=yes")
    )
    done = systemd_analyze_verify(verify_root(tmp_path, bad))
    assert "Unknown key" in done.stderr


@pytest.mark.parametrize("klass", CLASSES)
def test_unit_is_hardened_and_notifies(klass):
    text = (IMAGES / klass / "edgepack-agent.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.MULTILINE))
    assert settings["Type"] == "notify" and settings["WatchdogSec"] and settings["Restart"] in ("always", "on-failure")
    assert settings["User"] == "edgepack" and settings["StateDirectory"] == "edgepack"
    assert settings["ProtectSystem"] == "strict" and settings["NoNewPrivileges"] == "yes"
    assert settings["PrivateTmp"] == "yes" and settings["CapabilityBoundingSet"] == ""
    exec_start = settings["ExecStart"].split()
    assert exec_start == ENTRYPOINT  # the unit and the image config start the agent the same way
    assert read_env(IMAGES / klass / "image.env")["REQUIREMENT"].startswith("edgepack[agent")


@pytest.mark.parametrize("klass", CLASSES)
def test_containerfile_matches_the_builders_image_config(klass):
    text = (IMAGES / klass / "Containerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE)
    assert entrypoint and json.loads(entrypoint.group(1)) == ENTRYPOINT
    assert re.search(rf"^USER {USER}$", text, re.MULTILINE) and re.search(rf"^VOLUME {VOLUME}$", text, re.MULTILINE)
    assert re.search(rf"^EXPOSE {PORT}$", text, re.MULTILINE)
    assert "install-agent.sh /tmp/edgepack-build" in text and "--mount=type=bind" in text


@pytest.mark.parametrize("klass", CLASSES)
def test_default_agent_toml_is_valid(klass):
    config = load_config(IMAGES / klass / "agent.toml")
    assert config.state_dir == Path("/var/lib/edgepack") and config.trust_dir == Path("/etc/edgepack/trust")
    assert config.targets and config.broker.url is None  # offline until provisioned
    assert config.broker.cert == Path("/etc/edgepack/device.pem") and config.broker.key == Path(
        "/etc/edgepack/device.key"
    )


def test_classes_declare_what_the_builder_needs():
    for name in ("generic-x86", "intel-x86", "rpi4-arm64"):
        klass = load_class(name)
        assert klass.debian and "python3" in klass.packages and "systemd" in klass.packages
    assert load_class("generic-x86").requirement == "edgepack[agent-onnx]"
    assert load_class("intel-x86").requirement == "edgepack[agent-openvino]"
    assert load_class("rpi4-arm64").requirement == "edgepack[agent-litert]" and load_class("rpi4-arm64").arch == "arm64"
    jetson = load_class("jetson-orin")
    assert (
        not jetson.debian and "onnxruntime-gpu" in jetson.requirement and "l4t-jetpack" in jetson.settings["L4T_BASE"]
    )
    compilers = {"gcc", "g++", "build-essential", "python3-dev", "cc"}
    assert not compilers & set(load_class("generic-x86").packages)  # a device needs no compiler


def test_install_script_is_valid_sh():
    assert subprocess.run(["sh", "-n", str(IMAGES / "common/install-agent.sh")]).returncode == 0


def test_context_refuses_bad_factory_bundles(tmp_path, fleet, keyring):
    klass = load_class("generic-x86")
    untrusted, _ = linear_bundle(tmp_path, keyring.keys["stranger"])
    with pytest.raises(FirmwareError, match="does not verify against --trust"):
        write_context(klass, ContextSpec(trust=fleet.trust, factory=[untrusted]), [], tmp_path / "a")
    arm, _ = linear_bundle(tmp_path, fleet.key, target="rpi4")
    with pytest.raises(FirmwareError, match="built for target 'rpi4'"):
        write_context(klass, ContextSpec(trust=fleet.trust, factory=[arm]), [], tmp_path / "b")
    good, _ = linear_bundle(tmp_path, fleet.key)
    context = write_context(
        klass, ContextSpec(trust=fleet.trust, factory=[good], device_id="cam-7"), [], tmp_path / "c"
    )
    assert (context / "factory" / good.name).is_file() and (context / "trust/trust.json").is_file()
    assert load_config(context / "agent.toml").device_id == "cam-7"
    assert sorted(p.name for p in context.iterdir()) == sorted(
        [
            "Containerfile",
            "agent.toml",
            "edgepack-agent.service",
            "image.env",
            "install-agent.sh",
            "edgepack.sysusers",
            "wheels",
            "trust",
            "identity",
            "factory",
        ]
    )
