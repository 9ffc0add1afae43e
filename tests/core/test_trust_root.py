"""The TUF trust root: separate role keys, rotation by exactly N+1 under both thresholds, forged roots
refused, revocation through rotation, and expiry (an expired root serves what is installed, accepts nothing new)."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from edgepack import errors
from edgepack.bundle import verify_bundle
from edgepack.keys import SigningKey
from edgepack.manifest import utc_now
from edgepack.protocol import CommandTarget, RollbackCommand, new_command_fields, sign_command, verify_command
from edgepack.trust import HISTORY_DIR, TRUST_FILE, TrustStore, decode_signatures, tuf_key
from edgepack.trust_root import build_root, create, migrate_v01, rotate, sign_root

from .archive_tools import read_members


@pytest.fixture
def ring() -> dict[str, SigningKey]:
    return {n: SigningKey.generate() for n in ("root1", "root2", "root3", "root4", "release", "ops", "spare", "evil")}


def roles(ring: dict[str, SigningKey], **names: list[str]) -> dict[str, list]:
    return {role: [(ring[n].public, n) for n in keys] for role, keys in names.items()}


@pytest.fixture
def operator(tmp_path: Path, ring) -> TrustStore:
    """The operator's trust store: root 2-of-3, bundle 'release', command 'ops' (each role its own keys)."""
    spec = roles(ring, root=["root1", "root2", "root3"], bundle=["release"], command=["ops"])
    return create(tmp_path / "operator", spec, thresholds={"root": 2}, signers=[ring["root1"], ring["root2"]])


@pytest.fixture
def device(tmp_path: Path, operator: TrustStore) -> TrustStore:
    """A device's copy of version 1, as the firmware image ships it."""
    shutil.copytree(operator.directory, tmp_path / "device")
    return TrustStore.load(tmp_path / "device")


def command(key: SigningKey):
    return sign_command(RollbackCommand(**new_command_fields(CommandTarget(device="d1")), action="rollback",
                                        model="digits"), [key])  # fmt: skip


def next_root(store: TrustStore, ring, signers: list[str], *, version: int | None = None, **overrides) -> dict:
    """Version N+1 (or ``version``) of ``store`` with the given role keys, signed by ``signers``; not applied."""
    spec = {"root": ["root1", "root2", "root3"], "bundle": ["release"], "command": ["ops"]}
    spec.update(overrides.pop("roles", {}))
    root = build_root(roles(ring, **spec), overrides.pop("thresholds", {"root": 2}),
                      version=version or store.version + 1, expires=utc_now() + timedelta(days=30), **overrides)  # fmt: skip
    return sign_root(root, [ring[s] for s in signers]).to_dict()


def test_roles_have_their_own_keys(make_bundle, operator, ring, keyring):
    assert operator.thresholds == {"root": 2, "bundle": 1, "command": 1}
    assert sorted(operator.keys[ring["ops"].key_id].roles) == ["command"]
    doc = json.loads((operator.directory / TRUST_FILE).read_text())
    assert doc["signed"]["_type"] == "root" and len(doc["signatures"]) == 2  # TUF metadata, self-signed 2-of-3
    verify_command(command(ring["ops"]), operator)
    # the release key cannot sign commands, nor can a root key
    with pytest.raises(errors.ThresholdNotMetError, match="release.*does not hold the 'command' role"):
        verify_command(command(ring["release"]), operator)
    with pytest.raises(errors.ThresholdNotMetError, match="root1.*does not hold the 'command' role"):
        verify_command(command(ring["root1"]), operator)


def test_rotated_root_is_accepted_and_walked_in_order(operator, device, ring):
    rotate(operator, [ring["root1"], ring["root2"], ring["root4"]], add=roles(ring, root=["root4"]))
    rotate(operator, [ring["root1"], ring["root4"]], remove=[ring["root3"].key_id], add=roles(ring, command=["spare"]))
    rotate(operator, [ring["root1"], ring["root2"]], expires=utc_now() + timedelta(days=400))
    assert operator.version == 4 and sorted((operator.directory / HISTORY_DIR).iterdir())[-1].name == "4.root.json"
    # a device that missed versions 2 and 3 walks 1 -> 2 -> 3 -> 4
    assert device.update(operator.chain()) == [2, 3, 4]
    reloaded = TrustStore.load(device.directory)
    assert reloaded.version == 4 and ring["root3"].key_id not in reloaded.keys
    verify_command(command(ring["spare"]), reloaded)
    assert device.update(operator.chain()) == []  # the same retained chain again: nothing to do


def test_below_threshold_is_refused(device, ring):
    with pytest.raises(errors.TrustUpdateError, match="1 of the 2 valid signatures by the root keys of version 1"):
        device.update([next_root(device, ring, ["root1"])])
    assert device.version == 1 and TrustStore.load(device.directory).version == 1


def test_wrong_old_keys_are_refused(device, ring):
    # version 2 names new root keys and is signed by them alone: the old root keys never agreed
    forged = next_root(device, ring, ["evil", "spare"], roles={"root": ["evil", "spare"]})
    with pytest.raises(errors.TrustUpdateError, match="0 of the 2 valid signatures by the root keys of version 1"):
        device.update([forged])


def test_new_root_must_meet_its_own_threshold(device, ring):
    # signed by the old root keys, but version 2's own root role (root4 + spare, 2 of 2) signed only once
    forged = next_root(device, ring, ["root1", "root2", "root4"], roles={"root": ["root4", "spare"]})
    with pytest.raises(errors.TrustUpdateError, match="1 of the 2 valid signatures by the root keys of version 2"):
        device.update([forged])


def test_skipped_and_replayed_versions_are_refused(device, operator, ring):
    with pytest.raises(errors.TrustUpdateError, match="skipped-ahead"):
        device.update([next_root(device, ring, ["root1", "root2"], version=3)])
    rotate(operator, [ring["root1"], ring["root2"]])
    assert device.update(operator.chain(2)) == [2]
    # an altered version 2 cannot come back in a chain: it is not newer, so it is never looked at again,
    # and a version 3 must be signed by version 2's keys
    with pytest.raises(errors.TrustUpdateError, match="signatures"):
        device.update([next_root(device, ring, ["root3"], version=3)])


def test_tampered_root_is_refused(device, operator, ring):
    rotate(operator, [ring["root1"], ring["root2"]])
    doc = json.loads(operator.chain(2)[0])
    evil = tuf_key(ring["evil"].public, "release").to_dict()
    delegations = doc["signed"]["x-edgepack-roles"]
    bundle_role = next(r for r in delegations["roles"] if r["name"] == "bundle")
    bundle_role["keyids"] = [ring["evil"].key_id]  # swap the release key for the attacker's, keep the signatures
    delegations["keys"][ring["evil"].key_id] = evil
    with pytest.raises(errors.TrustUpdateError, match="0 of the 2 valid signatures"):
        device.update([doc])
    assert device.version == 1


def test_a_revoked_key_stays_revoked(device, operator, ring):
    rotate(operator, [ring["root1"], ring["root2"]], revoke=[ring["release"].key_id], add=roles(ring, bundle=["spare"]))
    device.update(operator.chain())
    unrevoke = next_root(device, ring, ["root1", "root2"], roles={"bundle": ["spare"]})
    with pytest.raises(errors.TrustUpdateError, match="un-revokes"):
        device.update([unrevoke])


def test_rotation_revokes_a_release_key(make_bundle, tmp_path, ring, keyring):
    spec = {"root": [(ring["root1"].public, "root1")], "bundle": [(keyring.keys["release"].public, "release")],
            "command": [(ring["ops"].public, "ops")]}  # fmt: skip
    operator = create(tmp_path / "op", spec, signers=[ring["root1"]])
    shutil.copytree(operator.directory, tmp_path / "dev")
    device = TrustStore.load(tmp_path / "dev")
    stolen_bundle, _ = make_bundle(signers=("release",))
    verify_bundle(stolen_bundle, device)
    verify_command(command(ring["ops"]), device)
    rotate(
        operator,
        [ring["root1"]],
        revoke=[keyring.keys["release"].key_id, ring["ops"].key_id],
        add={"bundle": [(keyring.keys["second"].public, "second")], "command": [(ring["spare"].public, "spare")]},
    )
    device.update(operator.chain())  # what the device gets over MQTT or from a file: no re-flash
    with pytest.raises(errors.RevokedKeyError, match="revoked key"):
        verify_bundle(stolen_bundle, device)
    with pytest.raises(errors.RevokedKeyError):
        verify_command(command(ring["ops"]), device)
    fresh, _ = make_bundle(signers=("second",))
    verify_bundle(fresh, device)
    verify_command(command(ring["spare"]), device)


def test_expired_root_accepts_nothing_new_until_refreshed(make_bundle, tmp_path, ring, keyring, monkeypatch):
    spec = {"root": [(ring["root1"].public, "root1")], "bundle": [(keyring.keys["release"].public, "release")],
            "command": [(ring["ops"].public, "ops")]}  # fmt: skip
    store = create(tmp_path / "t", spec, expires=utc_now() + timedelta(days=1), signers=[ring["root1"]])
    bundle, _ = make_bundle()
    verify_bundle(bundle, store)
    later = utc_now() + timedelta(days=2)
    monkeypatch.setattr("edgepack.trust.utc_now", lambda: later)
    assert store.describe()["expired"]
    with pytest.raises(errors.ExpiredTrustError, match="expired at .* keeps serving the installed models"):
        verify_bundle(bundle, store)
    with pytest.raises(errors.ExpiredTrustError):
        verify_command(command(ring["ops"]), store)
    # what is installed still verifies (boot, rollback): rule 9
    members = read_members(bundle)
    assert store.verify("manifest", members[0].data, decode_signatures(members[1].data), "bundle", installed=True)
    # a fresh root is still accepted (that is how an expired device recovers), then installs work again
    assert rotate(store, [ring["root1"]], expires=utc_now() + timedelta(days=30)).signed.version == 2
    assert not store.describe()["expired"]
    verify_bundle(bundle, store)


def test_an_expired_update_is_refused(device, ring, monkeypatch):
    stale = next_root(device, ring, ["root1", "root2"])
    monkeypatch.setattr("edgepack.trust.utc_now", lambda: utc_now() + timedelta(days=31))
    with pytest.raises(errors.TrustUpdateError, match="expired at"):
        device.update([stale])


def test_a_0_1_trust_store_is_migrated_with_its_keys_and_revocations(make_bundle, tmp_path, keyring, ring):
    old = tmp_path / "old"
    (old / "keys").mkdir(parents=True)
    entries = {}
    for name in ("release", "second"):
        kid = keyring.keys[name].key_id
        (old / "keys" / f"{kid}.pub").write_bytes(keyring.keys[name].public.to_pem())
        entries[kid] = {"file": f"keys/{kid}.pub", "name": name, "roles": ["bundle", "command"]}
    (old / TRUST_FILE).write_text(json.dumps({
        "version": 1, "keys": entries, "roles": {"bundle": {"threshold": 1}, "command": {"threshold": 1}},
        "revoked": [keyring.keys["second"].key_id],
    }))  # fmt: skip
    with pytest.raises(errors.TrustStoreError, match="edgepack 0.1.*trust migrate"):
        TrustStore.load(old)
    migrate_v01(old, [(ring["root1"].public, "root1")], signers=[ring["root1"]])
    store = TrustStore.load(old)
    assert store.version == 1 and store.revoked == {keyring.keys["second"].key_id}
    assert sorted(store.keys[keyring.keys["release"].key_id].roles) == ["bundle", "command"]
    verify_bundle(make_bundle(signers=("release",))[0], store)
    with pytest.raises(errors.RevokedKeyError):
        verify_bundle(make_bundle(signers=("second",))[0], store)
    assert (old / "trust.json.v01").is_file()
