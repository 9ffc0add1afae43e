"""A corrupt state.json or journal file does not take the device down, and journals do not grow forever.

The corrupt file is moved aside (``NAME.corrupt-STAMP``, bytes kept), the state is rebuilt from the
journals' committed outcomes and the bundles on disk, a notice says what happened (``describe_store`` and
so ``agent status`` show it), and the device boots serving its last committed model.
"""

from __future__ import annotations

import json

import pytest

from edgepack.agent import store as store_module
from edgepack.agent.config import load_config
from edgepack.agent.install import Installer
from edgepack.agent.live import LiveModels
from edgepack.agent.service import DeviceAgent, describe_store
from edgepack.agent.store import DeviceStore
from edgepack.errors import InstallError
from tests.models import linear_bundle

CORRUPTIONS = {
    "garbage": lambda good: b"\x00\xff not json at all \x13",
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "wrong-schema": lambda good: json.dumps({"version": 1, "models": {"linear": {"active": 5}}}).encode(),
    "wrong-version": lambda good: json.dumps({"version": 7, "models": {}}).encode(),
    "a-list": lambda good: b"[1, 2, 3]",
    "deeply-nested": lambda good: b"[" * 200_000 + b"]" * 200_000,
}


@pytest.fixture
def two_versions(tmp_path, trust, keyring):
    """A store with v1 as previous and v2 as active."""
    store = DeviceStore(tmp_path / "state")
    installer = Installer(store, LiveModels(), trust)
    v1 = installer.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=1.0)[0])
    v2 = installer.install(linear_bundle(tmp_path, keyring.keys["release"], version="2.0.0", scale=2.0)[0])
    return store, v1, v2


def _boot(store_root, trust):
    live = LiveModels()
    store = DeviceStore(store_root)
    installer = Installer(store, live, trust)
    installer.recover()
    return store, live, installer, installer.load_committed()


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_state_json_is_quarantined_rebuilt_and_serving_goes_on(two_versions, trust, kind):
    store, v1, v2 = two_versions
    state_file = store.root / "state.json"
    good = state_file.read_bytes()
    bad = CORRUPTIONS[kind](good)
    state_file.write_bytes(bad)

    store, live, _installer, loaded = _boot(store.root, trust)
    assert loaded == {"linear": "2.0.0 (active)"}
    assert live.current("linear").digest == v2.digest
    entry = store.load_state().models["linear"]
    assert (entry.active, entry.previous, entry.highest_version) == (v2.digest, v1.digest, "2.0.0")
    assert json.loads(state_file.read_bytes()) == json.loads(good)  # rewritten, valid again
    kept = list(store.root.glob("state.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == bad
    assert len(store.notices) == 1 and "state.json" in store.notices[0] and kept[0].name in store.notices[0]
    status = describe_store(store, live)
    assert status["notices"] == store.notices and status["models"]["linear"]["serving"] == "2.0.0"


def test_rebuild_keeps_the_anti_rollback_mark_after_an_explicit_rollback(two_versions, trust, keyring, tmp_path):
    store, v1, _v2 = two_versions
    Installer(store, LiveModels(), trust).rollback("linear")  # v1 active, v2's bundle deleted
    (store.root / "state.json").write_text("{ torn")
    store, _live, installer, loaded = _boot(store.root, trust)
    assert loaded == {"linear": "1.0.0 (active)"}
    entry = store.load_state().models["linear"]
    assert (entry.active, entry.previous, entry.highest_version) == (v1.digest, None, "2.0.0")
    with pytest.raises(InstallError, match="older than 2.0.0"):
        installer.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.5.0", scale=5.0)[0])


def test_rebuild_without_journals_uses_the_newest_bundle_on_disk(two_versions, trust):
    store, v1, v2 = two_versions
    for journal in (store.root / "journal").iterdir():
        journal.unlink()
    (store.root / "state.json").write_bytes(b"\xde\xad")
    store, _live, _installer, loaded = _boot(store.root, trust)
    assert loaded == {"linear": "2.0.0 (active)"}
    entry = store.load_state().models["linear"]
    assert (entry.active, entry.previous, entry.highest_version) == (v2.digest, v1.digest, "2.0.0")


def test_unmovable_corrupt_state_is_handled_once_and_held_in_memory(two_versions, trust, monkeypatch):
    store, _v1, v2 = two_versions
    (store.root / "state.json").write_bytes(b"garbage")
    fresh = DeviceStore(store.root)
    monkeypatch.setattr(fresh, "_quarantine", lambda path: None)  # e.g. a read-only remount
    monkeypatch.setattr(fresh, "commit_state", lambda state: (_ for _ in ()).throw(OSError(30, "Read-only")))
    for _ in range(3):
        assert fresh.load_state().models["linear"].active == v2.digest
    assert len(fresh.notices) == 1 and "held in memory" in fresh.notices[0]


def test_corrupt_journal_is_quarantined_and_boot_goes_on(two_versions, trust):
    store, _v1, v2 = two_versions
    first = sorted((store.root / "journal").glob("*.json"))[0]
    first.write_bytes(b'{"name": "linear", "state": ')
    (store.root / "journal" / "not-a-number.json").write_text(json.dumps({"name": "x"}))
    store, live, _installer, loaded = _boot(store.root, trust)
    assert loaded == {"linear": "2.0.0 (active)"} and live.current("linear").digest == v2.digest
    assert [j.path.name for j in store.journals()] == ["00000002-linear.json"]
    assert len(list((store.root / "journal").glob("*.corrupt-*"))) == 2
    assert len(store.notices) == 2 and all("journal" in n for n in store.notices)
    assert describe_store(store)["notices"] == store.notices


def test_device_agent_boots_on_a_corrupt_state_and_status_shows_the_notice(two_versions, trust):
    store, _v1, _v2 = two_versions
    (store.root / "state.json").write_text('{"version": 1, "models": {"linear": {"active": "nope"}}}')
    agent = DeviceAgent(load_config(None, {"state_dir": str(store.root), "trust_dir": str(trust.directory)}))
    try:
        assert agent.boot() == {"linear": "2.0.0 (active)"}
        status = agent.status()
        assert len(status["notices"]) == 1 and "corrupt" in status["notices"][0]
        assert status["models"]["linear"]["serving"] == "2.0.0"
    finally:
        agent.close()


def test_journals_are_pruned_but_never_unfinished_or_the_last_committed(tmp_path, monkeypatch):
    store = DeviceStore(tmp_path / "state")
    committed = store.new_journal("kept", "a" * 64, "1.0.0", "install")
    committed.advance("committed")
    unfinished = store.new_journal("linear", "b" * 64, "1.0.0", "install")
    for n in range(12):
        store.new_journal("linear", "c" * 64, f"1.0.{n}", "install").advance("rolled_back", "test")
    removed = store.prune_journals(keep=5)
    names = [j.path.name for j in store.journals()]
    assert len(removed) == 12 - 5  # the newest 5 finished kept, and the last committed one on top
    assert committed.path.name in names and unfinished.path.name in names
    assert len([j for j in store.journals() if j.finished]) == 6
    # the default bound, as the installer applies it after every install
    monkeypatch.setattr(store_module, "JOURNAL_KEEP", 3)
    store.prune_journals()
    assert len([j for j in store.journals() if j.finished]) == 4  # 3 + the last committed of "kept"
    # journal numbers are never reused after pruning
    assert store.new_journal("linear", "d" * 64, "2.0.0", "install").path.name.startswith("00000015-")


def test_installer_prunes_after_each_install(tmp_path, trust, keyring, monkeypatch):
    monkeypatch.setattr(store_module, "JOURNAL_KEEP", 2)
    store = DeviceStore(tmp_path / "state")
    installer = Installer(store, LiveModels(), trust)
    for minor in range(4):
        installer.install(linear_bundle(tmp_path, keyring.keys["release"], version=f"1.{minor}.0")[0])
    journals = store.journals()
    assert [j.data["version"] for j in journals] == ["1.2.0", "1.3.0"]
    assert journals[-1].data["committed_state"]["highest_version"] == "1.3.0"


def test_agent_status_command_prints_the_notice(two_versions, trust):
    from typer.testing import CliRunner

    from edgepack.cli import app

    store, _v1, _v2 = two_versions
    (store.root / "state.json").write_bytes(b"\x00 not json")
    result = CliRunner().invoke(app, ["agent", "status", "--state", str(store.root)])
    assert result.exit_code == 0, result.output
    assert "notice:" in result.output and "state.json" in result.output and "corrupt" in result.output
    assert list(store.root.glob("state.json.corrupt-*"))


def test_boot_removes_temporary_files_of_interrupted_writes(two_versions, trust):
    store, _v1, _v2 = two_versions
    for name in (".commands.json.abc123.tmp", ".state.json.def456.tmp"):
        (store.root / name).write_bytes(b"half a write")
    (store.root / "keep.tmp").write_bytes(b"not ours: no leading dot")
    agent = DeviceAgent(load_config(None, {"state_dir": str(store.root), "trust_dir": str(trust.directory)}))
    try:
        assert agent.boot() == {"linear": "2.0.0 (active)"}
        assert sorted(p.name for p in store.root.glob("*.tmp")) == ["keep.tmp"]
        assert not list(store.root.glob(".*.tmp"))
    finally:
        agent.close()
