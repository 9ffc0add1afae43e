"""The install state machine on a real device store with real onnxruntime models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgepack.agent.install import Installer
from edgepack.agent.live import LiveModels
from edgepack.agent.store import DeviceStore
from edgepack.bundle import _DirectorySink
from edgepack.errors import InstallError
from tests.models import linear_bundle, linear_reference

X = np.ones((2, 4), dtype=np.float32)


@pytest.fixture
def device(tmp_path, trust):
    store = DeviceStore(tmp_path / "state")
    live = LiveModels()
    installer = Installer(store, live, trust, device_targets={"x86"})
    return store, live, installer


def _served(live, name="linear"):
    with live.acquire(name) as model:
        return model.version, model.infer({"x": X})["y"]


def test_install_commits_and_serves(device, keyring, tmp_path):
    store, live, installer = device
    path, _manifest = linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=1.0)
    result = installer.install(path)
    assert result.outcome == "committed" and set(result.timings) == {"verify", "stage", "switch", "commit"}
    assert result.selftest["samples"] == 4
    version, y = _served(live)
    assert version == "1.0.0"
    np.testing.assert_allclose(y, linear_reference(X, 1.0), rtol=1e-5)
    state = store.load_state().models["linear"]
    assert state.active == result.digest and state.highest_version == "1.0.0" and state.previous is None
    assert (store.bundle_dir(result.digest) / "model.onnx").exists()


def test_upgrade_keeps_previous_and_explicit_rollback_goes_back(device, keyring, tmp_path):
    store, live, installer = device
    first = installer.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=1.0)[0])
    second = installer.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.1.0", scale=2.0)[0])
    state = store.load_state().models["linear"]
    assert (state.active, state.previous, state.highest_version) == (second.digest, first.digest, "1.1.0")
    assert _served(live)[0] == "1.1.0"
    back = installer.rollback("linear")
    assert back.outcome == "committed"
    version, y = _served(live)
    assert version == "1.0.0"
    np.testing.assert_allclose(y, linear_reference(X, 1.0), rtol=1e-5)
    state = store.load_state().models["linear"]
    assert state.active == first.digest and state.highest_version == "1.1.0"
    with pytest.raises(InstallError, match="no previous bundle"):
        installer.rollback("linear")


def test_selftest_failure_rolls_back_and_old_model_keeps_serving(device, keyring, tmp_path):
    store, live, installer = device
    good = installer.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=1.0)[0])
    bad, _ = linear_bundle(tmp_path, keyring.keys["release"], version="1.1.0", scale=2.0, selftest_scale=3.0)
    with pytest.raises(InstallError, match=r"stage failed: .*self-test"):
        installer.install(bad)
    assert _served(live)[0] == "1.0.0"
    assert store.load_state().models["linear"].active == good.digest
    last = store.journals()[-1].data
    assert last["outcome"] == "rolled_back" and "stage failed" in last["reason"]
    assert sorted(p.name for p in (store.root / "bundles").iterdir()) == [good.digest]


def test_lower_version_is_refused(device, keyring, tmp_path):
    _, live, installer = device
    installer.install(linear_bundle(tmp_path, keyring.keys["release"], version="2.0.0")[0])
    with pytest.raises(InstallError, match="older than 2.0.0"):
        installer.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.9.0", scale=5.0)[0])
    assert _served(live)[0] == "2.0.0"


def test_other_target_untrusted_and_garbage_are_refused(device, keyring, tmp_path):
    _store, live, installer = device
    installer.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0")[0])
    cases = [
        (
            linear_bundle(tmp_path, keyring.keys["release"], version="1.1.0", target="rpi4")[0],
            "built for target 'rpi4'",
        ),
        (linear_bundle(tmp_path, keyring.keys["stranger"], version="1.2.0", scale=3.0)[0], "unknown key"),
    ]
    garbage = tmp_path / "garbage.epk"
    garbage.write_bytes(b"not a bundle at all" * 100)
    cases.append((garbage, "refused garbage.epk"))
    for path, message in cases:
        with pytest.raises(InstallError, match=message):
            installer.install(path)
        assert _served(live)[0] == "1.0.0"


def test_two_models_side_by_side(device, keyring, tmp_path):
    store, live, installer = device
    installer.install(linear_bundle(tmp_path, keyring.keys["release"], name="detector", version="1.0.0")[0])
    installer.install(
        linear_bundle(tmp_path, keyring.keys["release"], name="classifier", version="3.0.0", scale=2.0)[0]
    )
    assert live.names() == ["classifier", "detector"]
    assert _served(live, "detector")[0] == "1.0.0" and _served(live, "classifier")[0] == "3.0.0"
    assert json.loads((store.root / "state.json").read_text())["models"].keys() == {"classifier", "detector"}


def test_boot_loads_committed_models(tmp_path, trust, keyring):
    store = DeviceStore(tmp_path / "state")
    Installer(store, LiveModels(), trust).install(linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0")[0])
    live = LiveModels()
    rebooted = Installer(DeviceStore(tmp_path / "state"), live, trust)
    assert rebooted.recover() == []
    assert rebooted.load_committed() == {"linear": "1.0.0 (active)"}
    assert _served(live)[0] == "1.0.0"


def test_boot_refuses_a_store_altered_on_disk(tmp_path, trust, keyring):
    store = DeviceStore(tmp_path / "state")
    result = Installer(store, LiveModels(), trust).install(linear_bundle(tmp_path, keyring.keys["release"])[0])
    model = store.bundle_dir(result.digest) / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    live = LiveModels()
    assert Installer(store, live, trust).load_committed() == {}
    assert "altered on disk" in live.index()[0]["reason"]


def test_signatures_are_verified_before_target_and_version_are_decided(device, keyring, tmp_path):
    """The target and anti-rollback checks read the manifest verification returned, not the unverified head:
    an untrusted bundle is refused for its signature whatever its head claims."""
    store, live, installer = device
    installer.install(linear_bundle(tmp_path, keyring.keys["release"], version="2.0.0")[0])
    before = sorted(p.name for p in (store.root / "bundles").iterdir())
    for kwargs in ({"version": "3.0.0", "target": "rpi4"}, {"version": "1.0.0", "scale": 4.0}):
        untrusted = linear_bundle(tmp_path, keyring.keys["stranger"], **kwargs)[0]
        with pytest.raises(InstallError, match="unknown key"):
            installer.install(untrusted)
    assert _served(live)[0] == "2.0.0"
    assert sorted(p.name for p in (store.root / "bundles").iterdir()) == before


def test_a_refused_bundle_leaves_nothing_in_the_store(device, keyring, tmp_path, monkeypatch):
    store, live, installer = device
    good = installer.install(linear_bundle(tmp_path, keyring.keys["release"], version="2.0.0")[0])
    written = []
    real_open = _DirectorySink.open
    monkeypatch.setattr(_DirectorySink, "open", lambda self, rel: written.append(rel) or real_open(self, rel))
    refused = [
        (linear_bundle(tmp_path, keyring.keys["release"], version="2.1.0", target="rpi4")[0], "target 'rpi4'"),
        (linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=3.0)[0], "older than 2.0.0"),
    ]
    for path, message in refused:
        with pytest.raises(InstallError, match=message):
            installer.install(path)
    assert written == []  # decided on the verified manifest before a byte of payload was written
    assert [p.name for p in (store.root / "bundles").iterdir()] == [good.digest]
    assert list((store.root / "tmp").iterdir()) == []
    assert all(j.finished for j in store.journals())
    assert _served(live)[0] == "2.0.0"
