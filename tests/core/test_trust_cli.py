"""``edgepack trust init|rotate|show`` and ``edgepack agent trust-update``, as an operator and a device run them:
separate role keys, a rotation that revokes a release key, the file applied with and without a daemon."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack import errors
from edgepack.agent.config import load_config
from edgepack.agent.control import ControlServer
from edgepack.agent.service import DeviceAgent
from edgepack.cli.agent_trust_cmd import apply_trust_file
from edgepack.keys import SigningKey
from edgepack.trust import TrustStore
from tests.models import linear_bundle


def ep(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"}, stdin=subprocess.DEVNULL)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"edgepack {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    for name in ("root1", "root2", "root3", "release", "release2", "ops"):
        SigningKey.generate().save(directory, name)
    return directory


def test_init_rotate_and_update_a_device_from_a_file(tmp_path, keys):
    op = tmp_path / "operator-trust"
    made = ep("trust", "init", str(op), "--root", str(keys / "root1.key"), "--root", str(keys / "root2.key"),
              "--root", str(keys / "root3.pub"), "--bundle", str(keys / "release.pub"),
              "--command", str(keys / "ops.pub"), "--threshold", "root=2", "--expires", "200d")  # fmt: skip
    assert "version 1" in made.stdout and "root 2-of-n" in made.stdout
    device_trust = tmp_path / "device-trust"
    shutil.copytree(op, device_trust)
    state = tmp_path / "state"

    release_id = SigningKey.load(keys / "release.key").key_id
    refused = ep("trust", "rotate", str(op), "--root-key", str(keys / "root1.key"), "--revoke", release_id[:12],
                 check=False)  # fmt: skip
    assert refused.returncode == 1 and "1 of the 2 valid signatures" in refused.stderr
    ep("trust", "rotate", str(op), "--root-key", str(keys / "root1.key"), "--root-key", str(keys / "root2.key"),
       "--revoke", release_id[:12], "--add", f"bundle={keys / 'release2.pub'}")  # fmt: skip
    assert "revoked" in ep("trust", "show", str(op)).stdout

    # a skipped or forged version is refused, the device keeps version 1
    forged = tmp_path / "forged.json"
    forged.write_bytes((op / "roots" / "2.root.json").read_bytes().replace(b'"version":2', b'"version":3'))
    bad = ep("agent", "trust-update", str(forged), "--state", str(state), "--trust", str(device_trust), check=False)
    assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    assert TrustStore.load(device_trust).version == 1

    applied = ep("agent", "trust-update", str(op / "roots" / "2.root.json"), "--state", str(state),
                 "--trust", str(device_trust))  # fmt: skip
    assert "trust root now version 2" in applied.stdout
    assert TrustStore.load(device_trust).revoked == {release_id}
    again = ep("agent", "trust-update", str(op / "roots" / "2.root.json"), "--state", str(state),
               "--trust", str(device_trust))  # fmt: skip
    assert "stays at version 2" in again.stdout


def test_trust_update_goes_through_a_running_daemon(tmp_path, keyring):
    from edgepack.trust_root import create, rotate

    root = SigningKey.generate()
    spec = {"root": [(root.public, "root")], "bundle": [(keyring.keys["release"].public, "release")],
            "command": [(keyring.keys["release"].public, "release")]}  # fmt: skip
    operator = create(tmp_path / "op", spec, signers=[root])
    shutil.copytree(operator.directory, tmp_path / "dev")
    state = tmp_path / "state"
    agent = DeviceAgent(load_config(None, {"state_dir": str(state), "trust_dir": str(tmp_path / "dev"),
                                           "targets": ["x86"]}))  # fmt: skip
    server = ControlServer(agent).start()
    try:
        agent.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0")[0])
        rotate(operator, [root], revoke=[keyring.keys["release"].key_id],
               add={"bundle": [(keyring.keys["second"].public, "second")]})  # fmt: skip
        result = apply_trust_file(operator.directory / "roots" / "2.root.json", state, None)
        assert result["applied"] == [2] and result["daemon"]["pid"] == os.getpid()
        assert agent.trust.version == 2  # the daemon's own store object, swapped in memory
        with pytest.raises(errors.InstallError) as refused:  # the revoked release key signs nothing new
            agent.install(linear_bundle(tmp_path / "b2", keyring.keys["release"], version="1.1.0")[0])
        assert "revoked" in str(refused.value) or isinstance(refused.value.__cause__, errors.RevokedKeyError)
        assert agent.install(linear_bundle(tmp_path / "b3", keyring.keys["second"], version="1.2.0")[0])
        assert agent.live.current("linear").version == "1.2.0"
    finally:
        server.stop()
        agent.close()
    # the store is released: a new agent takes it, boots version 2 and serves what it installed
    again = DeviceAgent(load_config(None, {"state_dir": str(state), "trust_dir": str(tmp_path / "dev")}))
    try:
        again.boot()
        assert again.trust.version == 2 and again.live.current("linear").version == "1.2.0"
    finally:
        again.close()


def test_a_k_of_n_ceremony_signs_in_turn(tmp_path, keys):
    op = tmp_path / "op"
    ep("trust", "init", str(op), "--root", str(keys / "root1.key"), "--root", str(keys / "root2.key"),
       "--bundle", str(keys / "release.pub"), "--command", str(keys / "ops.pub"), "--threshold", "root=2")  # fmt: skip
    draft = tmp_path / "2.root.json"
    ep("trust", "rotate", str(op), "--root-key", str(keys / "root1.key"), "--add", f"bundle={keys / 'release2.pub'}",
       "--out", str(draft))  # fmt: skip
    assert TrustStore.load(op).version == 1  # only written, not applied
    short = ep("trust", "apply", str(op), str(draft), check=False)
    assert short.returncode == 1 and "1 of the 2 valid signatures" in short.stderr
    ep("trust", "sign", str(draft), "--root-key", str(keys / "root2.key"))  # the second holder, on their machine
    assert "trust root now version 2" in ep("trust", "apply", str(op), str(draft)).stdout
    assert TrustStore.load(op).version == 2
