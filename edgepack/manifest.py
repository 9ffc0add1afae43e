"""The bundle manifest: the schema of ``manifest.json`` and its canonical encoding.

The manifest is the one document a bundle's signatures cover. It pins every payload file by size and
sha256, so verifying the signatures over the manifest bytes and then each file's hash verifies the whole
bundle. ``docs/bundle-format.md`` is the human-readable spec of these fields.

Canonical encoding (what is stored and signed): UTF-8 JSON with sorted keys, no insignificant whitespace,
no NaN/Infinity. :func:`parse_manifest` refuses bytes that are not in that form, so one manifest has
exactly one signed byte string; JSON nested deeper than ``edgepack.fsutil.MAX_JSON_DEPTH`` is a
``BundleFormatError`` like any other malformed manifest.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any, Literal

import semver
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgepack.errors import BundleFormatError
from edgepack.fsutil import loads_json

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURES_NAME = "signatures.json"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURES_NAME})

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DTYPES = (
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "bfloat16", "float32", "float64", "string",
)  # fmt: skip

Dim = int | str


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Model):
    """One input or output: its name, element type and shape.

    A dimension is a non-negative int when fixed, or a symbolic name (``"batch"``, ``"?"``) when it is
    dynamic. ``layout`` records the model's own axis order (``"NCHW"``) where it matters; ``native_layout``
    the order the compiled model uses on the device, when a converter changed it.
    """

    name: str = Field(min_length=1, max_length=256)
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    shape: list[Dim]
    layout: str | None = None
    native_layout: str | None = None

    @field_validator("shape")
    @classmethod
    def _dims_valid(cls, shape: list[Dim]) -> list[Dim]:
        for dim in shape:
            if isinstance(dim, int) and dim < 0:
                raise ValueError(f"dimension {dim} is negative; use a name such as 'batch' for a dynamic one")
        return shape

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)


class PayloadFile(_Model):
    """A file carried in the bundle, pinned by size and sha256."""

    path: str = Field(min_length=1, max_length=255)
    size: int = Field(ge=0)
    sha256: str
    role: Literal["model", "weights", "selftest", "aux", "log"] = "aux"

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if not _SHA256_RE.match(value):
            raise ValueError("must be 64 lowercase hex characters")
        return value

    @field_validator("path")
    @classmethod
    def _safe_path(cls, value: str) -> str:
        problem = unsafe_path_reason(value)
        if problem:
            raise ValueError(problem)
        return value


class RuntimeRequirement(_Model):
    """The runtime a bundle needs on the device and the versions it was validated against."""

    name: Literal["onnxruntime", "openvino", "litert"]
    version: str = Field(description="a PEP 440 specifier set, e.g. '>=1.18,<2'")

    @field_validator("version")
    @classmethod
    def _specifier(cls, value: str) -> str:
        try:
            SpecifierSet(value)
        except InvalidSpecifier as exc:
            raise ValueError(f"not a version range: {value!r}") from exc
        return value

    def admits(self, installed: str) -> bool:
        return SpecifierSet(self.version).contains(installed, prereleases=True)


class SelfTest(_Model):
    """Where the self-test vectors are and how close the device's outputs must come."""

    vectors: str = Field(description="payload path of an .npz with 'input.<name>' and 'output.<name>' arrays")
    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)
    samples: int = Field(ge=1)


class Manifest(_Model):
    """Everything a device needs to decide whether to run a bundle and how."""

    format_version: Literal[1] = FORMAT_VERSION
    name: str
    version: str
    target: str
    runtime: RuntimeRequirement
    model_file: str
    files: list[PayloadFile]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict[str, Any] = Field(default_factory=dict)
    execution: dict[str, Any] = Field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    selftest: SelfTest | None = None
    source_sha256: str | None = None
    toolchain: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    expires_at: datetime | None = None

    @field_validator("name", "target")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"{value!r} must be 1-128 of letters, digits, '.', '_' or '-'")
        return value

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not semver.Version.is_valid(value):
            raise ValueError(f"{value!r} is not a semantic version such as 1.2.0")
        return value

    @field_validator("source_sha256")
    @classmethod
    def _source_digest(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256_RE.match(value):
            raise ValueError("must be 64 lowercase hex characters")
        return value

    @field_validator("created_at", "expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a time zone (UTC)")
        return value

    @field_validator("files")
    @classmethod
    def _unique_paths(cls, files: list[PayloadFile]) -> list[PayloadFile]:
        seen: set[str] = set()
        for f in files:
            if f.path in RESERVED_NAMES:
                raise ValueError(f"payload may not be named {f.path!r}")
            if f.path in seen:
                raise ValueError(f"payload {f.path!r} is listed twice")
            seen.add(f.path)
        return files

    @model_validator(mode="after")
    def _references_exist(self) -> Manifest:
        paths = {f.path for f in self.files}
        if self.model_file not in paths:
            raise ValueError(f"model_file {self.model_file!r} is not among the payload files")
        if self.selftest and self.selftest.vectors not in paths:
            raise ValueError(f"selftest vectors {self.selftest.vectors!r} are not among the payload files")
        return self

    @property
    def semver(self) -> semver.Version:
        return semver.Version.parse(self.version)

    def file(self, path: str) -> PayloadFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    @property
    def payload_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_bytes(self) -> bytes:
        """The canonical bytes: what is stored as manifest.json and what signatures cover."""
        return canonical_json(self.model_dump(mode="json", exclude_none=False))


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes, which must be in canonical form."""
    try:
        raw = loads_json(data, parse_constant=reject_json_constant)
    except ValueError as exc:  # bad UTF-8, bad JSON, NaN/Infinity, nesting too deep (never RecursionError)
        raise BundleFormatError(f"manifest.json is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BundleFormatError("manifest.json must hold a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise BundleFormatError(
            f"bundle format version {raw.get('format_version')!r} is not supported "
            f"(this edgepack reads version {FORMAT_VERSION}); upgrade edgepack"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleFormatError(f"manifest.json is invalid: {validation_summary(exc)}") from exc
    if manifest.to_bytes() != data:
        raise BundleFormatError("manifest.json is not in canonical form (sorted keys, compact separators)")
    return manifest


def unsafe_path_reason(path: str) -> str | None:
    """Why ``path`` may not name a file inside a bundle, or None when it may."""
    if not path or len(path) > 255:
        return "path must be 1-255 characters"
    if "\\" in path or "\x00" in path or any(ord(c) < 32 for c in path):
        return f"path {path!r} holds a backslash or control character"
    if path.startswith("/"):
        return f"path {path!r} is absolute"
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return f"path {path!r} has an empty, '.' or '..' component"
    return None


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def reject_json_constant(name: str) -> Any:
    """``json.loads(parse_constant=...)``: NaN and Infinity are not JSON; refuse them."""
    raise ValueError(f"{name} is not allowed")


def validation_summary(exc: ValidationError, limit: int = 3) -> str:
    """The first ``limit`` problems of a pydantic error as one line: ``field.path: message; ...``."""
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{where}: {err['msg']}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
