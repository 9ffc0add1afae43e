"""generic-x86 built from a Debian root file system, validated as an OCI archive, and run: the agent in the
unpacked image, under chroot as its own user, installs the factory bundle, tells the test's NOTIFY_SOCKET it
is READY, and answers a KServe v2 inference exactly as the host computes it.

One build per module (``scripts/build-image``, the cache in ``.cache/firmware`` or $EDGEPACK_FIRMWARE_CACHE):
a few minutes cold (mmdebstrap, PyPI), about a minute cached. Skips, saying why, when not root or when
mmdebstrap/buildah/skopeo/umoci are missing (scripts/test installs them).

rpi4-arm64 runs the same checks under qemu-user emulation (binfmt_misc) when EDGEPACK_FIRMWARE_ARM64=1:
slower than the CI budget allows by default, so it is opt-in (docs/firmware.md has its figures).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from firmware.oci import ENTRYPOINT, inspect

from edgepack.agent.config import load_config
from edgepack.agent.service import DeviceAgent
from tests.firmware.conftest import REPO, FleetKeys, missing_image_tools
from tests.firmware.test_recipes import systemd_analyze_verify
from tests.models import linear_bundle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

READY_TIMEOUT_S = 900.0  # the factory self-test under emulation is slow


@dataclass(frozen=True)
class Case:
    """One device class under test: the factory bundle it gets and the inference it must answer."""

    klass: str
    arch: str
    model: str
    input_name: str
    x: np.ndarray
    package: str  # the runtime's folder in the image's site-packages
    tolerance: float = 1e-6  # same CPU family: the same numbers; another ISA may round a last bit differently

    def bundle(self, workdir: Path, key) -> Path:
        if self.klass == "rpi4-arm64":
            from tests.arm.models import conv_bundle

            return conv_bundle(workdir, key, name=self.model, target="rpi4")
        return linear_bundle(workdir, key, name=self.model, version="1.0.0", scale=2.0)[0]


CASES = {
    "generic-x86": Case(
        "generic-x86",
        "amd64",
        "linear",
        "x",
        np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 0.25, -1.0, 2.0]], dtype=np.float32),
        "onnxruntime",
    ),
    "rpi4-arm64": Case(
        "rpi4-arm64",
        "arm64",
        "conv",
        "input",
        np.random.default_rng(3).normal(0, 1, (1, 8, 8, 1)).astype(np.float32),
        "ai_edge_litert",
        1e-4,
    ),
}


@dataclass
class BuiltImage:
    archive: Path
    rootfs: Path
    bundle: Path
    build_output: str
    case: Case


def _identity(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cam-7")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "device.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "device.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return directory / "device.pem", directory / "device.key"


@pytest.fixture(scope="module", params=sorted(CASES))
def image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fleet: FleetKeys) -> BuiltImage:
    case = CASES[request.param]
    reason = missing_image_tools()
    if reason:
        pytest.skip(reason)
    if case.arch == "arm64" and os.environ.get("EDGEPACK_FIRMWARE_ARM64") != "1":
        pytest.skip("rpi4-arm64 under qemu-user is opt-in (EDGEPACK_FIRMWARE_ARM64=1): beyond the default CI budget")
    if case.arch == "arm64":
        pytest.importorskip("ai_edge_litert", reason="install edgepack[agent-litert]: the host run is the reference")
    work = tmp_path_factory.mktemp(case.klass)
    bundle = case.bundle(work, fleet.key)
    cert, key = _identity(work / "identity")
    archive = work / f"{case.klass}.tar"
    done = subprocess.run(
        [
            str(REPO / "scripts/build-image"),
            "--class",
            case.klass,
            "--trust",
            str(fleet.trust),
            "--factory-bundle",
            str(bundle),
            "--device-cert",
            str(cert),
            "--device-key",
            str(key),
            "--device-id",
            "cam-7",
            "-o",
            str(archive),
            "-v",
        ],
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert done.returncode == 0, f"build-image failed:\n{done.stdout}\n{done.stderr}"
    layout = work / "layout"
    layout.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(layout)], check=True)
    ref = json.loads((layout / "index.json").read_text())["manifests"][0]["annotations"][
        "org.opencontainers.image.ref.name"
    ]
    bundle_dir = work / "unpacked"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{ref}", str(bundle_dir)], check=True, capture_output=True)
    return BuiltImage(archive, bundle_dir / "rootfs", bundle, done.stdout + done.stderr, case)


def test_archive_validates_with_skopeo(image):
    found = inspect(image.archive)
    assert found["image"]["Architecture"] == image.case.arch and found["image"]["Os"] == "linux"
    assert len(found["image"]["Layers"]) == 1
    config = found["config"]["config"]
    assert config["Entrypoint"] == ENTRYPOINT and config["User"] == "edgepack"
    assert "/var/lib/edgepack" in config["Volumes"]
    assert found["image"]["Labels"]["io.edgepack.class"] == image.case.klass


def test_image_holds_the_agent_trust_identity_and_factory_bundle(image):
    root = image.rootfs
    passwd = dict(line.split(":", 1) for line in (root / "etc/passwd").read_text().splitlines())
    uid, gid = (int(v) for v in passwd["edgepack"].split(":")[1:3])
    assert (root / "etc/edgepack/trust/trust.json").is_file()
    assert (root / "usr/share/edgepack/factory" / image.bundle.name).read_bytes() == image.bundle.read_bytes()
    key = (root / "etc/edgepack/device.key").stat()
    assert (stat.S_IMODE(key.st_mode), key.st_uid, key.st_gid) == (0o640, 0, gid)  # the agent's group reads it
    assert (root / "etc/edgepack/device.pem").is_file()
    assert load_config(root / "etc/edgepack/agent.toml").device_id == "cam-7"
    state = (root / "var/lib/edgepack").stat()
    assert (state.st_uid, state.st_gid) == (uid, gid)
    wants = root / "etc/systemd/system/multi-user.target.wants/edgepack-agent.service"
    assert os.readlink(wants) == "/usr/lib/systemd/system/edgepack-agent.service"
    site = root / "opt/edgepack/lib/python3.11/site-packages"
    assert (site / image.case.package).is_dir() and not (
        site / "pip"
    ).exists()  # pip ran from its wheel, not left behind
    for compiler in ("usr/bin/gcc", "usr/bin/cc", "usr/bin/g++"):
        assert not (root / compiler).exists(), f"{compiler} in a device image"


def test_unit_verifies_inside_the_image(image):
    done = systemd_analyze_verify(image.rootfs)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


class NotifySocket:
    """systemd's side of sd_notify, bound inside the image's /run so the chrooted agent reaches it."""

    def __init__(self, root: Path) -> None:
        self.path = root / "run" / "edgepack-test-notify.sock"
        self.path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o666)  # the agent runs as edgepack

    def wait_for(self, field: str, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            lines = self.sock.recv(4096).decode().split("\n")
            if field in lines:
                return lines

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_output(tmp_path: Path, case: Case, bundle: Path, trust: Path) -> np.ndarray:
    overrides = {"state_dir": str(tmp_path / "host-state"), "trust_dir": str(trust)}
    agent = DeviceAgent(load_config(None, overrides))
    try:
        agent.install(bundle)
        with agent.live.acquire(case.model) as model:
            return next(iter(model.infer({case.input_name: case.x}).values()))
    finally:
        agent.close()


def test_agent_in_the_image_serves_the_factory_bundle_and_notifies_systemd(image, fleet, tmp_path):
    root, case = image.rootfs, image.case
    port = _free_port()
    notify = NotifySocket(root)
    # a mount namespace of its own: /dev and /proc for the chroot, gone when the agent exits
    script = (
        f"mount --rbind /dev {root}/dev && mount -t proc proc {root}/proc && "
        f"exec chroot --userspec=edgepack:edgepack {root} /usr/bin/env -i PATH=/usr/bin:/bin HOME=/var/lib/edgepack "
        f"NOTIFY_SOCKET=/run/{notify.path.name} WATCHDOG_USEC=2000000 "
        f"{' '.join(ENTRYPOINT)} --listen 127.0.0.1:{port}"
    )
    log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        try:
            ready = notify.wait_for("READY=1", READY_TIMEOUT_S)
        except TimeoutError:
            pytest.fail(
                f"no READY=1 within {READY_TIMEOUT_S} s; the agent said:\n{(tmp_path / 'agent.log').read_text()}"
            )
        assert any(line.startswith("STATUS=serving on http://127.0.0.1:") for line in ready)
        notify.wait_for("WATCHDOG=1", 30)  # the watchdog pings while the API answers
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": case.input_name,
                        "shape": list(case.x.shape),
                        "datatype": "FP32",
                        "data": case.x.ravel().tolist(),
                    }
                ]
            }
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/models/{case.model}/infer",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert answer["model_name"] == case.model and answer["model_version"] == "1.0.0"
        device = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(answer["outputs"][0]["shape"])
        np.testing.assert_allclose(
            device, _host_output(tmp_path, case, image.bundle, fleet.trust), rtol=case.tolerance, atol=case.tolerance
        )
        agent.send_signal(signal.SIGTERM)  # unshare forwards it: the agent stops cleanly and says so
        notify.wait_for("STOPPING=1", 60)
        assert agent.wait(60) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(30)
        log.close()
        notify.close()
    print(f"\n{image.build_output.strip().splitlines()[-1]}", file=sys.stderr)
