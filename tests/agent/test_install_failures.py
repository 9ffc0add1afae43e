"""Every step boundary of an install settles on any exception, not only on an EdgepackError.

An ``OSError`` (disk full, read-only remount) is injected at each step of an install of v2 over a
committed v1: in the journal write that opens a step, inside the step's work, and in the commit itself —
before ``state.json`` is renamed, and after it (the rename happened, the directory fsync failed). After
each, the live slot serves exactly what ``state.json`` on disk names, every journal has an outcome, and
the caller is told the truth: ``InstallError`` naming the step and the cause when it rolled back, a
committed result whose ``reason`` names the late failure when the commit had persisted.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

from edgepack.agent import install as install_module
from edgepack.agent.install import Installer
from edgepack.agent.live import LiveModels
from edgepack.agent.store import DeviceStore, Journal
from edgepack.errors import InstallError
from tests.models import linear_bundle, linear_reference

X = np.ones((1, 4), dtype=np.float32)


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "state.json")


@pytest.fixture
def device(tmp_path, trust, keyring):
    store = DeviceStore(tmp_path / "state")
    live = LiveModels()
    installer = Installer(store, live, trust, device_targets={"x86"})
    v1 = installer.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=1.0)[0])
    v2_path, _ = linear_bundle(tmp_path, keyring.keys["release"], version="2.0.0", scale=2.0)
    return store, live, installer, v1, v2_path


def _assert_settled(store: DeviceStore, live: LiveModels, expected_version: str) -> None:
    """The slot serves what state.json names, that is ``expected_version``, and every journal is finished."""
    on_disk = DeviceStore(store.root).load_state().models["linear"]
    serving = live.current("linear")
    assert serving is not None and serving.digest == on_disk.active
    assert serving.version == expected_version
    with live.acquire("linear") as model:
        scale = 1.0 if expected_version == "1.0.0" else 2.0
        np.testing.assert_allclose(model.infer({"x": X})["y"], linear_reference(X, scale), rtol=1e-5)
    journals = store.journals()
    assert journals and all(j.finished for j in journals), [j.data for j in journals]
    referenced = {d for d in (on_disk.active, on_disk.previous) if d}
    assert {p.name for p in (store.root / "bundles").iterdir()} == referenced
    assert list((store.root / "tmp").iterdir()) == []


def _fail_journal_once(monkeypatch, at_state: str) -> None:
    real = Journal.advance
    failed = []

    def advance(self, state, reason=None):
        if state == at_state and not failed:
            failed.append(state)
            raise OSError(errno.EROFS, "Read-only file system", str(self.path))
        return real(self, state, reason)

    monkeypatch.setattr(Journal, "advance", advance)


@pytest.mark.parametrize("step", ["verify", "stage", "switch", "commit"])
def test_journal_write_failing_at_a_step_rolls_back(device, monkeypatch, step):
    store, live, installer, _v1, v2_path = device
    _fail_journal_once(monkeypatch, step)
    with pytest.raises(InstallError, match=rf"2\.0\.0: {step} failed: OSError"):
        installer.install(v2_path)
    _assert_settled(store, live, "1.0.0")
    last = store.journals()[-1].data
    assert last["outcome"] == "rolled_back" and "Read-only file system" in last["reason"]


def _inject_work_failure(monkeypatch, store, live, step):
    if step == "verify":  # the disk fills while the bundle is extracted
        monkeypatch.setattr(install_module, "extract_bundle", _disk_full)
    elif step == "stage":
        monkeypatch.setattr(Installer, "_stage", _disk_full)
    elif step == "switch":  # the slot switched, then something after it in the swap raised
        real = live.swap

        def swap(name, new):
            real(name, new)
            if new is not None and new.version == "2.0.0":
                raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(live, "swap", swap)
    elif step == "commit-before-rename":
        monkeypatch.setattr(store, "commit_state", _disk_full)
    elif step == "cleanup-after-commit":  # state.json persisted; deleting the old bundles failed
        monkeypatch.setattr(store, "remove_unreferenced", _disk_full)
    elif step == "commit-dir-fsync":  # rename done, then the directory fsync failed
        real_commit = store.commit_state

        def commit_state(state):
            real_commit(state)
            raise OSError(errno.EIO, "Input/output error", str(store.root))

        monkeypatch.setattr(store, "commit_state", commit_state)
    else:  # pragma: no cover
        raise AssertionError(step)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        ("verify", "1.0.0"),
        ("stage", "1.0.0"),
        ("switch", "1.0.0"),
        ("commit-before-rename", "1.0.0"),
        ("commit-dir-fsync", "2.0.0"),
        ("cleanup-after-commit", "2.0.0"),
    ],
)
def test_oserror_in_each_step_settles_to_the_committed_state(device, monkeypatch, step, expected):
    store, live, installer, _v1, v2_path = device
    _inject_work_failure(monkeypatch, store, live, step)
    if expected == "1.0.0":
        with pytest.raises(InstallError) as caught:
            installer.install(v2_path)
        message = str(caught.value)
        assert "2.0.0" in message and "failed" in message and "OSError" in message
        if step not in ("verify", "stage"):  # it had switched: the committed model was put back
            assert "the committed 1.0.0 serves again" in message
        last = store.journals()[-1].data
        assert last["outcome"] == "rolled_back" and last["reason"] in message
        assert "OSError" in live.index()[0].get("reason", "")
    else:
        result = installer.install(v2_path)
        assert result.outcome == "committed"
        assert result.reason and "commit then failed" in result.reason and "OSError" in result.reason
        last = store.journals()[-1].data
        assert last["outcome"] == "committed" and last["committed_state"]["active"] == result.digest
    monkeypatch.undo()
    if step == "cleanup-after-commit":  # the old bundle was left behind: the next cleanup removes it
        store.remove_unreferenced(store.load_state())
    _assert_settled(store, live, expected)
    # a reboot serves the same as the running process did
    rebooted_live = LiveModels()
    rebooted = Installer(DeviceStore(store.root), rebooted_live, installer.trust)
    rebooted.recover()
    assert rebooted.load_committed() == {"linear": f"{expected} (active)"}
    if expected == "1.0.0":  # and the update still goes through afterwards
        assert installer.install(v2_path).outcome == "committed"
        _assert_settled(store, live, "2.0.0")


def test_unwritable_outcome_is_reported_and_settled_by_the_next_install(device, monkeypatch, tmp_path, keyring):
    store, live, installer, _v1, v2_path = device
    monkeypatch.setattr(Installer, "_stage", _disk_full)
    _fail_journal_once(monkeypatch, "rolled_back")
    with pytest.raises(InstallError, match="the journal could not be written"):
        installer.install(v2_path)
    assert not store.journals()[-1].finished  # the disk refused the outcome
    monkeypatch.undo()
    assert installer.install(v2_path).outcome == "committed"
    journals = store.journals()
    assert all(j.finished for j in journals)
    assert journals[-2].data["outcome"] == "rolled_back" and "earlier failure" in journals[-2].data["reason"]
    _assert_settled(store, live, "2.0.0")


def test_rollback_with_a_failing_commit_keeps_serving_the_committed_model(device, monkeypatch):
    store, live, installer, _v1, v2_path = device
    installer.install(v2_path)
    monkeypatch.setattr(store, "commit_state", _disk_full)
    with pytest.raises(InstallError, match=r"commit failed: OSError.*No space left.*free space"):
        installer.rollback("linear")
    monkeypatch.undo()
    _assert_settled(store, live, "2.0.0")
    assert installer.rollback("linear").outcome == "committed"
    _assert_settled(store, live, "1.0.0")


def test_first_install_failing_at_commit_serves_nothing(tmp_path, trust, keyring, monkeypatch):
    store = DeviceStore(tmp_path / "state")
    live = LiveModels()
    installer = Installer(store, live, trust)
    monkeypatch.setattr(store, "commit_state", _disk_full)
    with pytest.raises(InstallError, match="commit failed"):
        installer.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0")[0])
    assert live.current("linear") is None  # state.json names nothing, so nothing is served
    assert all(j.finished for j in store.journals())
    assert list((store.root / "bundles").iterdir()) == []
