"""Write, inspect, verify, extract and co-sign ``.epk`` bundles.

A bundle is a *canonical* POSIX ustar archive (spec: ``docs/bundle-format.md``)::

    manifest.json      canonical JSON, pins every payload file by size and sha256
    signatures.json    Ed25519 signatures over the manifest
    <payload files>    in the manifest's ``files`` order

Reading is streaming (constant memory whatever the bundle size) and strict. Why the reader is hand-written
on top of ``tarfile``'s header codec instead of ``tarfile.open``: ``tarfile`` is lenient by design — it
treats a corrupt header after the first as the end of the archive, ignores trailing bytes, applies PAX
overrides, and accepts links, sparse files and devices. A verifier must instead reject every byte it does
not expect, so here each header must equal the canonical header edgepack writes for that name and size,
padding must be zeros, and the archive must end exactly after its end marker. The result is still a plain
tar file that ``tar tvf`` lists.

Order of checks (nothing of the payload is read before the signatures verify)::

    manifest member → signatures member → parse manifest → trust rules (signatures, expiry)
    → the caller's check on the verified manifest (the device's target, anti-rollback, runtime)
    → each payload member: name, size, then streamed sha256 → end marker → end of file

``extract_bundle`` writes the payload into a staging directory beside the destination and renames it
into place only when everything verified; a rejected bundle leaves nothing behind. Before the rename every
file and directory of the staging tree is fsynced, and after it the parent directory, so a power cut
never leaves a ``bundles/HASH`` directory with missing or empty entries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from edgepack.errors import (
    BundleFormatError,
    MissingPayloadError,
    PayloadHashMismatchError,
    TruncatedBundleError,
    UnexpectedPayloadError,
    UnsafeArchiveError,
)
from edgepack.fsutil import atomic_writer, ensure_dir, file_digest, fsync_dir, fsync_tree
from edgepack.keys import SigningKey
from edgepack.manifest import (
    MANIFEST_NAME,
    SIGNATURES_NAME,
    Manifest,
    PayloadFile,
    RuntimeRequirement,
    SelfTest,
    TensorSpec,
    parse_manifest,
    unsafe_path_reason,
    utc_now,
)
from edgepack.trust import (
    Signature,
    TrustStore,
    check_not_expired,
    decode_signatures,
    encode_signatures,
    sign,
)

log = logging.getLogger(__name__)

BLOCK = 512
CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURES_BYTES = 64 << 10
MAX_PAYLOAD_FILES = 64
MAX_NAME_BYTES = 100  # ustar name field; edgepack writes no long-name extensions
_ZERO_BLOCK = bytes(BLOCK)


@dataclass(frozen=True)
class BundleFile:
    """A file to put in a bundle: its path inside the bundle, where it is now, and its role."""

    path: str
    source: Path
    role: str = "aux"


@dataclass(frozen=True)
class BundleInfo:
    """What ``inspect`` shows: the manifest and signatures as found, *not verified*."""

    manifest: Manifest
    signatures: list[Signature]
    size: int


# --- writing -------------------------------------------------------------------------------------


def write_bundle(
    out: Path,
    *,
    files: Sequence[BundleFile],
    signers: Sequence[SigningKey],
    name: str,
    version: str,
    target: str,
    runtime: RuntimeRequirement,
    model_file: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    metadata: dict[str, Any] | None = None,
    execution: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
    accuracy: dict[str, Any] | None = None,
    selftest: SelfTest | None = None,
    source_sha256: str | None = None,
    toolchain: dict[str, str] | None = None,
    expires_at: datetime | None = None,
) -> Manifest:
    """Hash ``files``, build and sign the manifest, and write the bundle to ``out`` atomically."""
    if not signers:
        raise BundleFormatError("a bundle needs at least one signing key (--key KEY)")
    pinned = [PayloadFile(path=f.path, role=f.role, **_size_and_digest(f.source)) for f in files]
    try:
        manifest = Manifest(
            name=name,
            version=version,
            target=target,
            runtime=runtime,
            model_file=model_file,
            files=pinned,
            inputs=inputs,
            outputs=outputs,
            metadata=metadata or {},
            execution=execution or {},
            quantization=quantization,
            accuracy=accuracy,
            selftest=selftest,
            source_sha256=source_sha256,
            toolchain=toolchain or {},
            created_at=utc_now(),
            expires_at=expires_at,
        )
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise BundleFormatError(f"cannot build the manifest: {exc}") from exc
    manifest_bytes = manifest.to_bytes()
    signatures = [sign("manifest", manifest_bytes, key) for key in signers]
    sources = {f.path: f.source for f in files}
    with atomic_writer(Path(out)) as fh:
        _write_member(fh, MANIFEST_NAME, manifest_bytes)
        _write_member(fh, SIGNATURES_NAME, encode_signatures(signatures))
        for pinned_file in manifest.files:
            _write_file_member(fh, pinned_file, sources[pinned_file.path])
        fh.write(_ZERO_BLOCK * 2)
    log.info("wrote %s (%s %s for %s)", out, manifest.name, manifest.version, manifest.target)
    return manifest


def add_signature(path: Path, key: SigningKey) -> list[Signature]:
    """Add ``key``'s signature to the bundle at ``path`` (rewritten atomically); returns all signatures."""
    path = Path(path)
    with open(path, "rb") as src:
        reader = _Reader(src)
        manifest_bytes, signatures_bytes = reader.read_head()
        manifest = parse_manifest(manifest_bytes)
        signatures = decode_signatures(signatures_bytes)
        signatures = [s for s in signatures if s.keyid != key.key_id]
        signatures.append(sign("manifest", manifest_bytes, key))
        with atomic_writer(path) as out:
            _write_member(out, MANIFEST_NAME, manifest_bytes)
            _write_member(out, SIGNATURES_NAME, encode_signatures(signatures))
            reader.copy_payload(manifest, out)
            out.write(_ZERO_BLOCK * 2)
    return signatures


# --- reading -------------------------------------------------------------------------------------


def read_info(path: Path) -> BundleInfo:
    """Read the manifest and signatures without verifying anything (for ``inspect``)."""
    with open(path, "rb") as fh:
        manifest_bytes, signatures_bytes = _Reader(fh).read_head()
    return BundleInfo(parse_manifest(manifest_bytes), decode_signatures(signatures_bytes), Path(path).stat().st_size)


def verify_bundle(path: Path, trust: TrustStore, *, now: datetime | None = None) -> Manifest:
    """Verify the bundle at ``path`` completely; writes nothing. Raises a BundleError subclass."""
    with open(path, "rb") as fh:
        return _Reader(fh).verify(trust, now=now, sink=None)


def extract_bundle(
    path: Path,
    dest: Path,
    trust: TrustStore,
    *,
    now: datetime | None = None,
    check: Callable[[Manifest], None] | None = None,
) -> Manifest:
    """Verify the bundle and extract it into ``dest`` (which must not exist yet).

    ``dest`` receives ``manifest.json``, ``signatures.json`` (so the bundle can be verified again in
    place) and the payload files. ``check``, when given, is called with the manifest right after its
    signatures and expiry verified and before any payload byte is written: the device's own rules (target,
    anti-rollback, runtime) are decided on the verified manifest, and what ``check`` raises refuses the
    bundle. The payload is written to a staging directory beside ``dest`` while it is hashed; each file
    is fsynced as it is closed, then every directory of the staging tree, then the staging directory is
    renamed to ``dest`` and ``dest``'s parent fsynced. ``dest`` appears, complete and durable, only when
    every check passed; a refused bundle leaves nothing behind.
    """
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    ensure_dir(dest.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".staging", dir=dest.parent))
    try:
        sink = _DirectorySink(staging)
        with open(path, "rb") as fh:
            reader = _Reader(fh)
            manifest = reader.verify(trust, now=now, sink=sink, check=check)
        for name, data in zip((MANIFEST_NAME, SIGNATURES_NAME), reader.head, strict=True):
            with sink.open(name) as out:
                out.write(data)
                sink.close(out)
        fsync_tree(staging)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(dest.parent)
    return manifest


# --- archive internals ---------------------------------------------------------------------------


def canonical_header(name: str, size: int) -> bytes:
    """The exact 512-byte ustar header edgepack writes for a member."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


def _padding(size: int) -> int:
    return -size % BLOCK


def _write_member(fh: IO[bytes], name: str, data: bytes) -> None:
    fh.write(canonical_header(name, len(data)))
    fh.write(data)
    fh.write(bytes(_padding(len(data))))


def _write_file_member(fh: IO[bytes], pinned: PayloadFile, source: Path) -> None:
    fh.write(canonical_header(pinned.path, pinned.size))
    digest = hashlib.sha256()
    written = 0
    with open(source, "rb") as src:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            written += len(chunk)
            fh.write(chunk)
    if written != pinned.size or digest.hexdigest() != pinned.sha256:
        raise BundleFormatError(f"{source} changed while the bundle was being written")
    fh.write(bytes(_padding(written)))


def _size_and_digest(path: Path) -> dict[str, Any]:
    try:
        size, sha256 = file_digest(path, CHUNK)
    except OSError as exc:
        raise BundleFormatError(f"cannot read {path}: {exc.strerror}") from exc
    return {"size": size, "sha256": sha256}


class _DirectorySink:
    """Receives verified payload members and writes them under a staging directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, relpath: str) -> BinaryIO:
        target = self.root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        return open(target, "xb")

    @staticmethod
    def close(fh: BinaryIO) -> None:
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()


@dataclass
class _Reader:
    """Strict streaming reader of one bundle file (see the module docstring)."""

    fh: BinaryIO
    offset: int = 0
    seen: set[str] = field(default_factory=set)
    members: int = 0
    head: tuple[bytes, bytes] = (b"", b"")

    def read_head(self) -> tuple[bytes, bytes]:
        manifest = self._read_small_member(MANIFEST_NAME, MAX_MANIFEST_BYTES)
        signatures = self._read_small_member(SIGNATURES_NAME, MAX_SIGNATURES_BYTES)
        self.head = (manifest, signatures)
        return self.head

    def verify(
        self,
        trust: TrustStore,
        *,
        now: datetime | None,
        sink: _DirectorySink | None,
        check: Callable[[Manifest], None] | None = None,
    ) -> Manifest:
        manifest_bytes, signatures_bytes = self.read_head()
        manifest = parse_manifest(manifest_bytes)
        if len(manifest.files) > MAX_PAYLOAD_FILES:
            raise UnsafeArchiveError(f"manifest lists {len(manifest.files)} files; the cap is {MAX_PAYLOAD_FILES}")
        trust.verify("manifest", manifest_bytes, decode_signatures(signatures_bytes), role="bundle")
        check_not_expired(manifest, now)
        if check is not None:
            check(manifest)
        for index, pinned in enumerate(manifest.files):
            name, size = self._next_header(required=f"payload {pinned.path}")
            if name is None:
                raise MissingPayloadError(f"payload {pinned.path} is missing: the archive ends before it")
            self._check_expected(name, manifest.files, index)
            if size != pinned.size:
                raise PayloadHashMismatchError(
                    f"payload {pinned.path}: size {size} in the archive, {pinned.size} in the signed manifest"
                )
            self._stream_member(pinned, sink)
        self._expect_end()
        return manifest

    def copy_payload(self, manifest: Manifest, out: IO[bytes]) -> None:
        """Copy the payload members to ``out`` unchanged (for co-signing), checking their hashes."""
        for index, pinned in enumerate(manifest.files):
            name, size = self._next_header(required=f"payload {pinned.path}")
            if name is None:
                raise MissingPayloadError(f"payload {pinned.path} is missing")
            self._check_expected(name, manifest.files, index)
            out.write(canonical_header(name, size))
            self._stream_member(pinned, None, copy_to=out)
            out.write(bytes(_padding(size)))
        self._expect_end()

    # --- members ---

    def _read_small_member(self, expected: str, cap: int) -> bytes:
        name, size = self._next_header(required=expected)
        if name != expected:
            raise BundleFormatError(
                f"expected {expected} as member {self.members} of the archive, found {name!r}: "
                "not an edgepack bundle, or one written by something else"
            )
        if size > cap:
            raise UnsafeArchiveError(f"{expected} is {size} bytes; the cap is {cap}")
        data = self._read_exact(size, what=expected)
        self._skip_padding(size, what=expected)
        return data

    def _stream_member(
        self, pinned: PayloadFile, sink: _DirectorySink | None, copy_to: IO[bytes] | None = None
    ) -> None:
        digest = hashlib.sha256()
        out = sink.open(pinned.path) if sink else None
        try:
            remaining = pinned.size
            while remaining:
                chunk = self._read_exact(min(CHUNK, remaining), what=f"payload {pinned.path}")
                digest.update(chunk)
                if out is not None:
                    out.write(chunk)
                if copy_to is not None:
                    copy_to.write(chunk)
                remaining -= len(chunk)
        finally:
            if out is not None and sink is not None:
                sink.close(out)
        if digest.hexdigest() != pinned.sha256:
            raise PayloadHashMismatchError(
                f"payload {pinned.path}: sha256 mismatch (archive {digest.hexdigest()[:12]}…, "
                f"signed manifest {pinned.sha256[:12]}…): the file was altered after signing"
            )
        self._skip_padding(pinned.size, what=f"payload {pinned.path}")

    def _check_expected(self, name: str, files: list[PayloadFile], index: int) -> None:
        expected = files[index].path
        if name == expected:
            return
        later = {f.path for f in files[index + 1 :]}
        if name in later:
            raise MissingPayloadError(f"payload {expected} is missing (found {name} in its place)")
        raise UnexpectedPayloadError(f"archive holds {name!r}, which the signed manifest does not list")

    # --- blocks ---

    def _next_header(self, *, required: str) -> tuple[str | None, int]:
        """Parse the next header; (None, 0) at a valid end marker."""
        block = self._read_exact(BLOCK, what=f"the header of {required}")
        if block == _ZERO_BLOCK:
            return None, 0
        self.members += 1
        if self.members > MAX_PAYLOAD_FILES + 2:
            raise UnsafeArchiveError(f"more than {MAX_PAYLOAD_FILES + 2} members in the archive")
        try:
            info = tarfile.TarInfo.frombuf(block, encoding="utf-8", errors="strict")
        except (tarfile.HeaderError, UnicodeDecodeError) as exc:
            raise BundleFormatError(f"corrupt archive header at byte {self.offset - BLOCK}: {exc}") from exc
        if info.type != tarfile.REGTYPE or info.issym() or info.islnk():
            kind = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link", tarfile.DIRTYPE: "directory"}
            raise UnsafeArchiveError(
                f"archive member {info.name!r} is a {kind.get(info.type, f'non-regular entry (type {info.type!r})')}"
                "; bundles hold regular files only"
            )
        reason = unsafe_path_reason(info.name)
        if reason:
            raise UnsafeArchiveError(f"archive member rejected: {reason}")
        if info.name in self.seen:
            raise UnsafeArchiveError(f"archive member {info.name!r} appears twice")
        self.seen.add(info.name)
        if len(info.name.encode()) > MAX_NAME_BYTES or block != canonical_header(info.name, info.size):
            raise BundleFormatError(
                f"archive header of {info.name!r} is not canonical (mode, owner, time or format differ): "
                "it was not written by edgepack or was altered"
            )
        return info.name, info.size

    def _expect_end(self) -> None:
        name, _ = self._next_header(required="the end marker")
        if name is not None:
            raise UnexpectedPayloadError(f"archive holds {name!r}, which the signed manifest does not list")
        if self._read_exact(BLOCK, what="the end marker") != _ZERO_BLOCK:
            raise BundleFormatError("archive end marker is corrupt")
        if self.fh.read(1):
            raise BundleFormatError(f"unexpected data after the end of the archive (byte {self.offset})")

    def _skip_padding(self, size: int, *, what: str) -> None:
        pad = _padding(size)
        if pad and self._read_exact(pad, what=what) != bytes(pad):
            raise BundleFormatError(f"non-zero padding after {what}")

    def _read_exact(self, n: int, *, what: str) -> bytes:
        data = self.fh.read(n)
        self.offset += len(data)
        if len(data) != n:
            raise TruncatedBundleError(f"bundle is truncated: it ends inside {what} (at byte {self.offset})")
        return data
