"""Every class of tampering is rejected with its own error, and random mutations never verify."""

from __future__ import annotations

import json
import tarfile
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepack import errors
from edgepack.bundle import verify_bundle
from edgepack.manifest import utc_now
from edgepack.trust import TrustStore
from edgepack.trust_root import rotate

from .archive_tools import data_offset, member, raw_member, read_members, write_members


def _flip(path, offset, mask=0x01):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(bytes(raw))


def test_flipped_payload_byte(make_bundle, trust):
    path, _ = make_bundle()
    _flip(path, data_offset(path, "model.onnx") + 1000)
    with pytest.raises(errors.PayloadHashMismatchError, match=r"payload model.onnx: sha256 mismatch"):
        verify_bundle(path, trust)


def test_flipped_manifest_byte(make_bundle, trust):
    path, _ = make_bundle()
    members = read_members(path)
    members[0].data = members[0].data.replace(b'"digits"', b'"digitz"')
    write_members(path, members)
    with pytest.raises(errors.SignatureInvalidError, match="does not match the manifest"):
        verify_bundle(path, trust)


def test_flipped_signature_byte(make_bundle, trust):
    path, _ = make_bundle()
    members = read_members(path)
    doc = json.loads(members[1].data)
    import base64

    sig = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
    sig[10] ^= 0x40
    doc["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    members[1].data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    write_members(path, members)
    with pytest.raises(errors.SignatureInvalidError):
        verify_bundle(path, trust)


def test_missing_file(make_bundle, trust):
    path, _ = make_bundle()
    members = read_members(path)
    write_members(path, [m for m in members if m.name != "model.onnx"])
    with pytest.raises(errors.MissingPayloadError, match="model.onnx is missing"):
        verify_bundle(path, trust)


def test_missing_last_file(make_bundle, trust):
    path, _ = make_bundle()
    write_members(path, read_members(path)[:-1])
    with pytest.raises(errors.MissingPayloadError, match="labels.txt is missing"):
        verify_bundle(path, trust)


def test_extra_file(make_bundle, trust):
    path, _ = make_bundle()
    write_members(path, [*read_members(path), member("backdoor.py", b"import os")])
    with pytest.raises(errors.UnexpectedPayloadError, match="backdoor.py"):
        verify_bundle(path, trust)


def test_path_traversal_name(make_bundle, trust):
    path, _ = make_bundle()
    members = read_members(path)
    members.insert(2, raw_member(tarfile.TarInfo("../../etc/cron.d/evil"), b"* * * * * root sh"))
    write_members(path, members)
    with pytest.raises(errors.UnsafeArchiveError, match=r"'\.\.' component"):
        verify_bundle(path, trust)


def test_absolute_path_name(make_bundle, trust):
    path, _ = make_bundle()
    members = read_members(path)
    members.insert(2, raw_member(tarfile.TarInfo("/etc/passwd"), b"root::0:0"))
    write_members(path, members)
    with pytest.raises(errors.UnsafeArchiveError, match="absolute"):
        verify_bundle(path, trust)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_link_entry(make_bundle, trust, kind):
    path, _ = make_bundle()
    members = read_members(path)
    info = tarfile.TarInfo("model.onnx")
    info.type = kind
    info.linkname = "/etc/shadow"
    members[2] = raw_member(info)
    write_members(path, members)
    with pytest.raises(errors.UnsafeArchiveError, match="link"):
        verify_bundle(path, trust)


def test_duplicate_name(make_bundle, trust):
    path, _ = make_bundle()
    members = read_members(path)
    members.insert(3, members[2])
    write_members(path, members)
    with pytest.raises(errors.UnsafeArchiveError, match="appears twice"):
        verify_bundle(path, trust)


def test_truncated_archive(make_bundle, trust):
    path, _ = make_bundle()
    raw = path.read_bytes()
    for cut in (100, 600, data_offset(path, "model.onnx") + 10, len(raw) - 512):
        path.write_bytes(raw[:cut])
        with pytest.raises(errors.TruncatedBundleError, match="truncated"):
            verify_bundle(path, trust)


def test_trailing_data(make_bundle, trust):
    path, _ = make_bundle()
    path.write_bytes(path.read_bytes() + b"\x00" * 512 + b"smuggled")
    with pytest.raises(errors.BundleFormatError, match="after the end"):
        verify_bundle(path, trust)


def test_non_canonical_header(make_bundle, trust):
    path, _ = make_bundle()
    members = read_members(path)
    info = tarfile.TarInfo("labels.txt")
    info.mtime = 1_700_000_000
    members[3] = raw_member(info, members[3].data)
    write_members(path, members)
    with pytest.raises(errors.BundleFormatError, match="not canonical"):
        verify_bundle(path, trust)


def test_oversized_manifest_is_refused_before_reading(make_bundle, trust):
    path, _ = make_bundle()
    members = read_members(path)
    members[0] = member("manifest.json", b" " * (2 << 20))
    write_members(path, members)
    with pytest.raises(errors.UnsafeArchiveError, match="cap"):
        verify_bundle(path, trust)


def test_size_in_header_differs_from_manifest(make_bundle, trust):
    path, _ = make_bundle()
    members = read_members(path)
    members[2] = member("model.onnx", members[2].data + b"x")
    write_members(path, members)
    with pytest.raises(errors.PayloadHashMismatchError, match="size 3001 in the archive, 3000 in the signed manifest"):
        verify_bundle(path, trust)


def test_unknown_key(make_bundle, trust):
    path, _ = make_bundle(signers=("stranger",))
    with pytest.raises(errors.UnknownKeyError, match="signed by unknown key"):
        verify_bundle(path, trust)


def test_revoked_key(make_bundle, trust, keyring):
    path, _ = make_bundle(signers=("release",))
    rotate(trust, [keyring.keys["release"], keyring.keys["second"]], revoke=[keyring.keys["release"].key_id[:10]])
    with pytest.raises(errors.RevokedKeyError, match="revoked key"):
        verify_bundle(path, TrustStore.load(trust.directory))


def test_fewer_signatures_than_threshold(make_bundle, keyring, tmp_path):
    store = TrustStore.init(
        tmp_path / "t3",
        [keyring.public("release"), keyring.public("second"), keyring.public("stranger")],
        threshold=3,
    )
    path, _ = make_bundle(signers=("release", "second"))
    with pytest.raises(errors.ThresholdNotMetError, match="2 of 3 required signatures"):
        verify_bundle(path, store)


def test_expired_bundle(make_bundle, trust):
    path, _ = make_bundle(expires_at=utc_now() - timedelta(minutes=1))
    with pytest.raises(errors.ExpiredBundleError, match="expired at"):
        verify_bundle(path, trust)
    fresh, _ = make_bundle(expires_at=utc_now() + timedelta(days=1))
    verify_bundle(fresh, trust)


@pytest.fixture
def small_bundle(tmp_path_factory):
    """One small valid bundle and its trust store, shared by the property test's examples."""
    from edgepack.bundle import BundleFile, write_bundle
    from edgepack.keys import SigningKey
    from edgepack.manifest import RuntimeRequirement, TensorSpec

    root = tmp_path_factory.mktemp("prop")
    key = SigningKey.generate()
    key.save(root, "k")
    (root / "m.onnx").write_bytes(b"\x01\x02model" * 40)
    path = root / "b.epk"
    write_bundle(
        path,
        files=[BundleFile("m.onnx", root / "m.onnx", "model")],
        signers=[key],
        name="p",
        version="1.0.0",
        target="x86",
        runtime=RuntimeRequirement(name="onnxruntime", version=">=1.18"),
        model_file="m.onnx",
        inputs=[TensorSpec(name="x", dtype="float32", shape=[1, 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[1, 4])],
    )
    store = TrustStore.init(root / "trust", [root / "k.pub"])
    return path.read_bytes(), store, root


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_mutations_never_verify(small_bundle, data):
    original, store, root = small_bundle
    mutated = bytearray(original)
    count = data.draw(st.integers(min_value=1, max_value=4))
    for _ in range(count):
        pos = data.draw(st.integers(min_value=0, max_value=len(original) - 1))
        mutated[pos] = data.draw(st.integers(0, 255).filter(lambda b, p=pos: b != original[p]))
    if data.draw(st.booleans()):  # sometimes also truncate or extend
        cut = data.draw(st.integers(min_value=0, max_value=len(original) + 1024))
        mutated = mutated[:cut] if cut <= len(original) else mutated + bytes(cut - len(original))
    if bytes(mutated) == original:
        return
    path = root / "mutated.epk"
    path.write_bytes(bytes(mutated))
    with pytest.raises(errors.BundleError):
        verify_bundle(path, store)
