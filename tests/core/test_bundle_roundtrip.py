"""Creating, signing, verifying, inspecting and extracting bundles through the API."""

from __future__ import annotations

import builtins
import os
import subprocess
from pathlib import Path

import pytest

from edgepack.bundle import add_signature, extract_bundle, read_info, verify_bundle
from edgepack.errors import BundleFormatError, PayloadHashMismatchError, ThresholdNotMetError
from edgepack.manifest import parse_manifest
from edgepack.trust import TrustStore

from .archive_tools import data_offset, read_members


def test_round_trip_create_sign_verify_inspect(make_bundle, trust, keyring, tmp_path):
    path, manifest = make_bundle()
    assert verify_bundle(path, trust) == manifest
    info = read_info(path)
    assert info.manifest == manifest
    assert [s.keyid for s in info.signatures] == [keyring.keys["release"].key_id]
    add_signature(path, keyring.keys["second"])
    assert {s.keyid for s in read_info(path).signatures} == {
        keyring.keys["release"].key_id,
        keyring.keys["second"].key_id,
    }
    assert verify_bundle(path, trust) == manifest
    extracted = tmp_path / "extracted"
    extract_bundle(path, extracted, trust)
    assert (extracted / "model.onnx").read_bytes() == b"onnx-bytes" * 300
    assert (extracted / "labels.txt").read_text() == "zero\none\n"


def test_bundle_is_a_plain_tar_that_tar_lists(make_bundle):
    path, _ = make_bundle()
    listing = subprocess.run(["tar", "tf", str(path)], capture_output=True, text=True, check=True).stdout.split()
    assert listing == ["manifest.json", "signatures.json", "model.onnx", "labels.txt"]


def test_manifest_is_canonical_and_pins_every_file(make_bundle):
    path, manifest = make_bundle()
    members = read_members(path)
    assert parse_manifest(members[0].data) == manifest
    assert [f.path for f in manifest.files] == ["model.onnx", "labels.txt"]
    assert manifest.file("model.onnx").size == 3000 and manifest.file("model.onnx").role == "model"


def test_two_of_two_threshold_needs_both_signatures(make_bundle, keyring, tmp_path):
    store = TrustStore.init(tmp_path / "t2", [keyring.public("release"), keyring.public("second")], threshold=2)
    path, _ = make_bundle()
    with pytest.raises(ThresholdNotMetError, match="1 of 2 required signatures"):
        verify_bundle(path, store)
    add_signature(path, keyring.keys["second"])
    verify_bundle(path, store)


def test_verify_writes_nothing(make_bundle, trust, monkeypatch):
    path, _ = make_bundle()
    real_open, real_os_open = builtins.open, os.open
    writes: list[str] = []

    def spy_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            writes.append(f"{file} ({mode})")
        return real_open(file, mode, *args, **kwargs)

    def spy_os_open(file, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            writes.append(f"{file} (os.open)")
        return real_os_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    verify_bundle(path, trust)
    assert writes == []


def test_rejected_extraction_leaves_nothing_behind(make_bundle, trust, tmp_path):
    path, _ = make_bundle()
    raw = bytearray(path.read_bytes())
    raw[data_offset(path, "labels.txt")] ^= 0x01  # the second payload file: the first was already written
    path.write_bytes(bytes(raw))
    dest_parent = tmp_path / "store"
    dest_parent.mkdir()
    with pytest.raises(PayloadHashMismatchError, match="labels.txt: sha256 mismatch"):
        extract_bundle(path, dest_parent / "b", trust)
    assert list(dest_parent.iterdir()) == []


def test_not_a_bundle_is_a_format_error(tmp_path, trust):
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"\x08\x07" + b"protobuf-ish" * 100)
    with pytest.raises(BundleFormatError):
        verify_bundle(bogus, trust)


def test_co_signing_keeps_payload_bytes(make_bundle, keyring):
    path, _ = make_bundle()
    before = [(m.name, m.data) for m in read_members(path)][2:]
    add_signature(path, keyring.keys["second"])
    assert [(m.name, m.data) for m in read_members(path)][2:] == before
    assert Path(path).stat().st_size % 512 == 0
