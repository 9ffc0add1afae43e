"""Deeply nested JSON is a format error (BundleFormatError, ValueError), never a RecursionError."""

from __future__ import annotations

import pytest

from edgepack.bundle import MANIFEST_NAME, SIGNATURES_NAME, _write_member, read_info, verify_bundle
from edgepack.errors import BundleFormatError, SignatureInvalidError
from edgepack.fsutil import MAX_JSON_DEPTH, loads_json, read_json
from edgepack.manifest import parse_manifest
from edgepack.trust import decode_signatures, encode_signatures


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 900, 100_000])
def test_parse_manifest_refuses_deep_nesting(depth):
    with pytest.raises(BundleFormatError, match="nest"):
        parse_manifest(_nested(depth))
    inner = b'{"format_version":1,"metadata":{"x":' + _nested(depth) + b"}}"
    with pytest.raises(BundleFormatError, match="nest"):
        parse_manifest(inner)


def test_loads_json_bounds_depth_and_reads_ordinary_json(tmp_path):
    assert loads_json(b'{"a": [[1]]}') == {"a": [[1]]}
    assert loads_json(_nested(MAX_JSON_DEPTH)) is not None
    for depth in (MAX_JSON_DEPTH + 1, 5000):
        with pytest.raises(ValueError, match="nest"):
            loads_json(_nested(depth))
    (tmp_path / "deep.json").write_bytes(b'{"k":' * 3000 + b"1" + b"}" * 3000)
    with pytest.raises(ValueError):
        read_json(tmp_path / "deep.json")
    with pytest.raises(ValueError, match="UTF-8"):
        loads_json(b"\xff")


def test_a_bundle_with_a_deeply_nested_manifest_or_signatures_is_a_format_error(tmp_path, trust):
    deep_manifest = tmp_path / "deep-manifest.epk"
    with open(deep_manifest, "wb") as fh:
        _write_member(fh, MANIFEST_NAME, _nested(200_000))
        _write_member(fh, SIGNATURES_NAME, encode_signatures([]))
        fh.write(bytes(1024))
    with pytest.raises(BundleFormatError):
        read_info(deep_manifest)
    with pytest.raises(BundleFormatError):
        verify_bundle(deep_manifest, trust)
    with pytest.raises(SignatureInvalidError):
        decode_signatures(b"[" * 60_000)
