"""Fuzzing the bundle reader (read_info, verify_bundle, extract_bundle) and the manifest parser.

Inputs: structure-blind mutations of a valid bundle (flips, cuts, splices), hand-built archives whose members
are valid-looking but hostile (fuzzed manifest JSON in a canonical header, links, directories, traversal,
PAX headers, huge declared sizes, too many members), and fuzzed manifest documents (mutated valid ones,
arbitrary JSON, raw bytes, deep nesting). Besides "no exception but EdgepackError", every refused extraction
must leave nothing beside its destination, and nothing that is not the original bundle may verify.
"""

from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgepack.bundle import _padding, canonical_header, extract_bundle, read_info, verify_bundle
from edgepack.errors import BundleFormatError
from edgepack.manifest import parse_manifest
from tests.fuzz.common import (
    COUNTS,
    deep_nesting,
    encode_json,
    fuzz_settings,
    json_values,
    mutated_bytes,
    mutated_json,
    tolerate,
)

_counter = itertools.count()

MANIFEST_INTERESTING = {
    "format_version": [0, 2, "1", None, 1.0, True],
    "name": ["", "a" * 300, "../x", "ok", None, 5],
    "version": ["1.0", "01.0.0", "1.0.0-rc.1+b", "", "9" * 400],
    "files": [[], [{"path": "../../etc/passwd", "size": 1, "sha256": "0" * 64}], None, [{}]],
    "model_file": ["", "missing.onnx", "model.onnx"],
    "created_at": ["2020-01-01T00:00:00", "not a date", 0, "9999-12-31T23:59:59Z"],
    "expires_at": ["2000-01-01T00:00:00Z", "2999-01-01T00:00:00+00:00", -1],
    "inputs": [[], [{"name": "x", "dtype": "float32", "shape": [-1]}], [{"name": "x", "dtype": "nope", "shape": []}]],
    "runtime": [{"name": "onnxruntime", "version": "!!"}, {"name": "tensorrt", "version": ">=1"}, {}],
    "selftest": [{"vectors": "nope", "atol": -1, "rtol": 0, "samples": 0}, None],
}


def _member(name: str, data: bytes) -> bytes:
    return canonical_header(name, len(data)) + data + bytes(_padding(len(data)))


def _write(directory: Path, data: bytes) -> Path:
    path = directory / f"in{next(_counter)}.epk"
    path.write_bytes(data)
    return path


def _exercise(world, path: Path, kind: str) -> None:
    """Every reader entry point on one file; a refused extraction leaves nothing behind."""
    tolerate(f"bundle reader: {kind}: read_info", read_info, path)
    verified = tolerate(f"bundle reader: {kind}: verify", verify_bundle, path, world.trust)
    parent = path.parent / f"x{next(_counter)}"
    parent.mkdir()
    dest = parent / "bundle"
    extracted = tolerate(f"bundle reader: {kind}: extract", extract_bundle, path, dest, world.trust)
    if extracted is None:
        assert list(parent.iterdir()) == [], f"a refused extraction left {list(parent.iterdir())}"
    if verified is not None or extracted is not None:
        # only the original signed manifest can verify; its payload is pinned, so the bytes are the original's
        assert path.read_bytes() == world.bundle_bytes, "an altered bundle verified"


@fuzz_settings(400)
@given(data=st.data())
def test_mutated_bundle_bytes(world, tmp_path_factory, data):
    blob = data.draw(mutated_bytes(world.bundle_bytes))
    _exercise(world, _write(tmp_path_factory.getbasetemp(), blob), "mutated bytes")


@fuzz_settings(300)
@given(raw=st.booleans(), data=st.data())
def test_archives_with_fuzzed_manifests(world, tmp_path_factory, raw, data):
    """A canonical archive around a fuzzed manifest: the parser, not the tar framing, is what gets hit."""
    doc = data.draw(mutated_json(world.manifest_json, MANIFEST_INTERESTING))
    body = encode_json(doc, canonical=not raw)
    rest = b"".join(_split_members(world.bundle_bytes)[1:]) + bytes(1024)  # signatures, payload, end marker
    archive = _member("manifest.json", body) + rest
    _exercise(world, _write(tmp_path_factory.getbasetemp(), archive), "fuzzed manifest in archive")


def _tar_member(info: tarfile.TarInfo, data: bytes, fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()[:-1024]  # without tarfile's end marker


hostile_names = st.sampled_from(
    ["../evil", "/abs", "a/../../b", "a//b", ".", "x\\y", "ctl\x01", "é" * 200, "m" * 300, "manifest.json",
     "signatures.json", "model.onnx", "labels.txt"]
) | st.text(min_size=1, max_size=40)  # fmt: skip
member_types = st.sampled_from([tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE,
                                tarfile.CHRTYPE, tarfile.CONTTYPE, b"7", tarfile.GNUTYPE_SPARSE])  # fmt: skip


@fuzz_settings(300)
@given(
    name=hostile_names,
    kind=member_types,
    fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    payload=st.binary(max_size=600),
    position=st.integers(0, 4),
    extra=st.integers(0, 3),
)
def test_hostile_archive_members(world, tmp_path_factory, name, kind, fmt, payload, position, extra):
    """Valid head, then a hostile member spliced in among the payload members (or after the end)."""
    members = _split_members(world.bundle_bytes)
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(payload) if kind == tarfile.REGTYPE else 0
    info.linkname = "model.onnx" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    try:
        hostile = _tar_member(info, payload, fmt)
    except (ValueError, UnicodeError):  # tarfile itself cannot write this name in this format
        return
    members.insert(min(position, len(members)), hostile * (1 + extra))
    _exercise(world, _write(tmp_path_factory.getbasetemp(), b"".join(members) + bytes(1024)), "hostile member")


@fuzz_settings(150)
@given(declared=st.integers(0, 2**40), cut=st.integers(0, 2048), member=st.integers(0, 4))
def test_declared_sizes_that_lie(world, tmp_path_factory, declared, cut, member):
    """A member header whose size field claims more (or less) than the file holds."""
    members = _split_members(world.bundle_bytes)
    index = min(member, len(members) - 1)
    header = bytearray(members[index][:512])
    size_field = f"{declared:011o}".encode()[-11:] + b"\0"
    header[124:136] = size_field
    header[148:156] = b"        "
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    members[index] = bytes(header) + members[index][512 : 512 + cut]
    _exercise(world, _write(tmp_path_factory.getbasetemp(), b"".join(members[: index + 1])), "lying size")


def test_many_members_and_deep_manifest(world, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    many = b"".join(_member(f"f{i}", b"x") for i in range(200)) + bytes(1024)
    _exercise(world, _write(base, _member("manifest.json", world.manifest.to_bytes()) + many), "many members")
    deep = _member("manifest.json", deep_nesting(100_000, "dict")) + _split_members(world.bundle_bytes)[1]
    _exercise(world, _write(base, deep + bytes(1024)), "deeply nested manifest")


def _split_members(blob: bytes) -> list[bytes]:
    """The archive's members (header + data + padding each), without the end marker."""
    out, offset = [], 0
    while offset + 512 <= len(blob) and blob[offset : offset + 512] != bytes(512):
        size = int(blob[offset + 124 : offset + 136].rstrip(b"\0 ") or b"0", 8)
        end = offset + 512 + size + _padding(size)
        out.append(blob[offset:end])
        offset = end
    return out


# --- the manifest parser on its own ----------------------------------------------------------------


@fuzz_settings(1000)
@given(data=st.data(), canonical=st.booleans())
def test_manifest_parser_mutated_documents(world, data, canonical):
    doc = data.draw(mutated_json(world.manifest_json, MANIFEST_INTERESTING))
    manifest = tolerate("manifest parser: mutated document", parse_manifest, encode_json(doc, canonical=canonical))
    if manifest is not None:
        assert manifest.to_bytes() == encode_json(doc, canonical=True)


@fuzz_settings(500)
@given(value=json_values)
def test_manifest_parser_arbitrary_json(value):
    tolerate("manifest parser: arbitrary JSON", parse_manifest, encode_json(value, canonical=True))


@fuzz_settings(500)
@given(blob=st.binary(max_size=2048) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_manifest_parser_raw_bytes(blob):
    tolerate("manifest parser: raw bytes", parse_manifest, blob)


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_manifest_parser_deep_nesting(kind, depth):
    """Hostile nesting is a BundleFormatError, never a RecursionError (issue 12, item 7)."""
    COUNTS["manifest parser: deep nesting"] += 1
    with pytest.raises(BundleFormatError):
        parse_manifest(b'{"x":' + deep_nesting(depth, kind) + b"}")
