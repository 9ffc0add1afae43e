"""The MQTT wire protocol of edgepack: topics and versioned message schemas, validated on receipt.

Both sides import this module and nothing else defines a topic or a message (the spec, with examples, is
``docs/protocol.md``). Topics live under a configurable prefix (default ``edgepack``)::

    {prefix}/devices/{device}/cmd     operator → device   retained, QoS 1   SignedCommand
    {prefix}/groups/{group}/cmd       operator → group    retained, QoS 1   SignedCommand
    {prefix}/groups/{group}/trust     operator → group    retained, QoS 1   TrustUpdate (root versions, TUF-signed)
    {prefix}/devices/{device}/state   device → anyone     retained, QoS 1   DeviceState (last will: online=false)
    {prefix}/devices/{device}/events  device → operator   QoS 1             Event (accepted, progress, need, result, rejected)
    {prefix}/bundles/{bundle}/index   operator → devices  retained, QoS 1   ChunkIndex
    {prefix}/chunks/{sha256}          operator → devices  retained, QoS 1   the chunk's raw bytes
    {prefix}/operators/{client}/sync  operator → itself   QoS 1             a marker (see fleet/deploy.py)
    {prefix}/devices/{device}/capture      device → operator  QoS 1   CaptureChunk, CaptureEnd (docs/capture.md)
    {prefix}/devices/{device}/capture/ctl  operator → device  QoS 1   SignedCaptureControl (pull, ack; config retained)

Every JSON message carries ``"v": 1``. Messages a device acts on (commands, indexes) are strict: unknown
fields are refused, so the bytes a signature covers mean exactly one thing. Messages the operator reads
(events, states) ignore unknown fields, so agents can add information without breaking older operators.

Commands are signed: the signature (:func:`edgepack.trust.sign` with kind ``"command"``) covers the
canonical JSON of the ``command`` object, which names its recipient, a unique id and a sequence number, so
it cannot be redirected to another device or replayed (the device keeps the rules, in ``agent/link/book.py``).
An install command pins the chunk index by sha256, the index pins every chunk by sha256, and the command
pins the whole bundle file by sha256: content addressing from the signed command down to every byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from edgepack.errors import (
    BundleError,
    EdgepackError,
    ExpiredBundleError,
    IndexMismatchError,
    MalformedMessageError,
    RevokedKeyError,
    RollbackRefusedError,
    SelfTestError,
    SignatureInvalidError,
    TargetMismatchError,
    ThresholdNotMetError,
    UnknownCommandError,
    UnknownKeyError,
)
from edgepack.keys import SigningKey
from edgepack.manifest import canonical_json, reject_json_constant, utc_now, validation_summary
from edgepack.trust import Signature, TrustStore, sign

PROTOCOL_VERSION = 1
DEFAULT_PREFIX = "edgepack"
DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 256
MAX_CHUNK_SIZE = 16 << 20
MAX_CHUNKS = 65536
MAX_COMMAND_BYTES = 64 << 10
MAX_INDEX_BYTES = 8 << 20
MAX_EVENT_BYTES = 1 << 20
MAX_NEED_CHUNKS = 1024
MAX_TRUST_BYTES = 1 << 20
MAX_TRUST_ROOTS = 64
DEFAULT_COMMAND_TTL = timedelta(days=7)

COMMAND_ACTIONS = ("install", "rollback")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._=:-]{0,127}"
NAME_RE = re.compile(rf"^{_NAME}$")

DeviceId = Annotated[str, Field(pattern=rf"^{_NAME}$")]
GroupName = Annotated[str, Field(pattern=rf"^{_NAME}$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
CommandId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


# --- topics --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopicMatch:
    """What a received topic is: ``kind`` and the id in it (device, group, bundle digest or chunk hash)."""

    kind: Literal["device_cmd", "group_cmd", "group_trust", "state", "events", "index", "chunk", "sync", "capture", "capture_ctl"]
    key: str


@dataclass(frozen=True)
class Topics:
    """Every topic of the protocol under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        parts = self.prefix.split("/")
        if not self.prefix or any(not p or set(p) & set("+#\x00") for p in parts):
            raise MalformedMessageError(
                f"topic prefix {self.prefix!r} must be non-empty '/'-separated words without '+', '#' or empty parts"
            )

    def device_command(self, device: str) -> str:
        return f"{self.prefix}/devices/{_checked(device)}/cmd"

    def group_command(self, group: str) -> str:
        return f"{self.prefix}/groups/{_checked(group)}/cmd"

    def group_trust(self, group: str) -> str:
        return f"{self.prefix}/groups/{_checked(group)}/trust"

    def state(self, device: str) -> str:
        return f"{self.prefix}/devices/{_checked(device)}/state"

    def events(self, device: str) -> str:
        return f"{self.prefix}/devices/{_checked(device)}/events"

    def index(self, bundle: str) -> str:
        return f"{self.prefix}/bundles/{bundle}/index"

    def capture(self, device: str) -> str:
        """Captured records, chunked, from the device to the operator pulling them."""
        return f"{self.prefix}/devices/{_checked(device)}/capture"

    def capture_control(self, device: str) -> str:
        """The operator's signed pull requests and acknowledgements to the device."""
        return f"{self.prefix}/devices/{_checked(device)}/capture/ctl"

    def chunk(self, sha256: str) -> str:
        return f"{self.prefix}/chunks/{sha256}"

    def operator_sync(self, client_id: str) -> str:
        """An operator's own topic: a message to itself marks the end of the retained messages before it."""
        return f"{self.prefix}/operators/{_checked(client_id)}/sync"

    @property
    def all_states(self) -> str:
        return f"{self.prefix}/devices/+/state"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}/devices/+/events"

    def parse(self, topic: str) -> TopicMatch | None:
        """Classify a topic under this prefix; None for anything else."""
        if not topic.startswith(self.prefix + "/"):
            return None
        parts = topic[len(self.prefix) + 1 :].split("/")
        match parts:
            case ["devices", device, "cmd"]:
                return TopicMatch("device_cmd", device)
            case ["groups", group, "cmd"]:
                return TopicMatch("group_cmd", group)
            case ["groups", group, "trust"]:
                return TopicMatch("group_trust", group)
            case ["devices", device, "state"]:
                return TopicMatch("state", device)
            case ["devices", device, "events"]:
                return TopicMatch("events", device)
            case ["devices", device, "capture"]:
                return TopicMatch("capture", device)
            case ["devices", device, "capture", "ctl"]:
                return TopicMatch("capture_ctl", device)
            case ["bundles", bundle, "index"]:
                return TopicMatch("index", bundle)
            case ["chunks", sha]:
                return TopicMatch("chunk", sha)
            case ["operators", client_id, "sync"]:
                return TopicMatch("sync", client_id)
        return None


def _checked(name: str) -> str:
    if not NAME_RE.match(name):
        raise MalformedMessageError(
            f"{name!r} cannot be a device or group name in a topic (letters, digits, '._=:-', at most 128)"
        )
    return name


def groups_from_labels(labels: Mapping[str, str]) -> list[str]:
    """The groups a device is in: ``KEY=VALUE`` for each label, and each comma-separated value of ``group``.

    ``--label group=cams --label site=plant-3`` puts a device in ``cams``, ``group=cams`` and ``site=plant-3``.
    Names that cannot appear in a topic are left out (the agent logs them).
    """
    groups = {f"{k}={v}" for k, v in labels.items()}
    groups |= {g.strip() for g in labels.get("group", "").split(",") if g.strip()}
    return sorted(g for g in groups if NAME_RE.match(g))


# --- messages ------------------------------------------------------------------------------------


class _Strict(BaseModel):
    """A message the device acts on: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _Lenient(BaseModel):
    """A message the operator reads: unknown fields (from newer agents) are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class ChunkRef(_Strict):
    sha256: Sha256
    size: int = Field(ge=1, le=MAX_CHUNK_SIZE)


class ChunkIndex(_Strict):
    """How a bundle file is cut into content-addressed chunks: every chunk but the last is ``chunk_size``."""

    v: Literal[1] = 1
    kind: Literal["index"] = "index"
    bundle: Sha256  # sha256 of the bundle's canonical manifest: the device store's name for it
    size: int = Field(ge=1, le=MAX_CHUNKS * MAX_CHUNK_SIZE)
    sha256: Sha256  # of the whole bundle file
    chunk_size: int = Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    chunks: list[ChunkRef] = Field(min_length=1, max_length=MAX_CHUNKS)

    def inconsistency(self) -> str | None:
        """Why the sizes in this index cannot describe one file cut into ``chunk_size`` pieces, or None."""
        expected = math.ceil(self.size / self.chunk_size)
        if len(self.chunks) != expected:
            return f"{len(self.chunks)} chunks listed, but {self.size} bytes in {self.chunk_size}-byte chunks make {expected}"
        for position, ref in enumerate(self.chunks):
            want = self.chunk_size if position < expected - 1 else self.size - self.chunk_size * (expected - 1)
            if ref.size != want:
                return f"chunk {position} is listed as {ref.size} bytes where it must be {want}"
        total = sum(ref.size for ref in self.chunks)
        if total != self.size:  # pragma: no cover - implied by the loop above
            return f"chunk sizes add up to {total} bytes, not the {self.size} the index states"
        return None

    def to_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))


class CommandTarget(_Strict):
    """Whom a command is for: exactly one device or one group."""

    device: DeviceId | None = None
    group: GroupName | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> CommandTarget:
        if (self.device is None) == (self.group is None):
            raise ValueError("a command goes to exactly one of 'device' or 'group'")
        return self

    def describe(self) -> str:
        return f"device {self.device}" if self.device else f"group {self.group}"


class _CommandBase(_Strict):
    id: CommandId
    seq: int = Field(ge=1)  # grows with every command an operator issues (its issue time in µs by default)
    issued_at: datetime
    expires_at: datetime | None = None
    to: CommandTarget
    model: str = Field(min_length=1, max_length=128)


class InstallCommand(_CommandBase):
    """Fetch the bundle ``bundle`` through its chunk index and install it."""

    action: Literal["install"]
    version: str = Field(min_length=1, max_length=64)
    target: str = Field(min_length=1, max_length=64)  # the bundle's target (e.g. "x86")
    bundle: Sha256
    size: int = Field(ge=1, le=MAX_CHUNKS * MAX_CHUNK_SIZE)
    sha256: Sha256
    index_sha256: Sha256


class RollbackCommand(_CommandBase):
    """Go back to the kept previous bundle of ``model``."""

    action: Literal["rollback"]


Command = Annotated[Union[InstallCommand, RollbackCommand], Field(discriminator="action")]


class SignatureEntry(_Strict):
    keyid: Sha256
    sig: str = Field(max_length=256)


class SignedCommand(_Strict):
    """What goes on a command topic: the command and the signatures over its canonical bytes."""

    v: Literal[1] = 1
    command: Command
    signatures: list[SignatureEntry] = Field(default_factory=list, max_length=16)

    def signed_bytes(self) -> bytes:
        return command_bytes(self.command)

    def trust_signatures(self) -> list[Signature]:
        return [Signature.from_json(entry.model_dump()) for entry in self.signatures]


class TrustUpdate(_Strict):
    """New versions of the trust root, oldest first: each one a TUF root document (``{"signed", "signatures"}``).

    The message needs no signature of its own: every root in it is signed by root keys, and a device
    applies one only by the rotation rule of ``edgepack/trust.py`` (N+1, signed by N's and its own root keys).
    """

    v: Literal[1] = 1
    kind: Literal["trust"] = "trust"
    roots: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_TRUST_ROOTS)


class _Event(_Lenient):
    v: Literal[1] = 1
    device: str
    at: datetime
    seq: int = 0  # counts the events of one agent process, to spot gaps
    command_id: str | None = None


class AcceptedEvent(_Event):
    """The device accepted a command (or resumed one after a restart) and is working on it."""

    kind: Literal["accepted"] = "accepted"
    action: str
    model: str
    resumed: bool = False


class ProgressEvent(_Event):
    """How far a command got: ``download`` while chunks arrive, then the install states."""

    kind: Literal["progress"] = "progress"
    phase: str  # index, download, downloaded, verify, stage, switch, commit
    bundle: str | None = None
    held_bytes: int = 0
    total_bytes: int = 0


class NeedEvent(_Event):
    """The device is missing these pieces of a bundle and nothing arrived for a while: please publish again."""

    kind: Literal["need"] = "need"
    bundle: str
    index: bool = False
    chunks: list[int] = Field(default_factory=list, max_length=MAX_NEED_CHUNKS)  # positions in the index


class TransferCounters(_Lenient):
    """What one agent process received for a transfer; ``resumed_bytes`` were on disk when it (re)started."""

    resumed_bytes: int = 0
    received_bytes: int = 0
    duplicate_bytes: int = 0
    rejected_bytes: int = 0


class ResultEvent(_Event):
    """How a command ended. ``rolled_back``: the install state machine refused it and the live model stayed;
    ``failed``: it ended before the install (transfer, quota, index, stalled, deadline, expired);
    ``superseded``: a newer command replaced it (``code`` ``superseded`` for a newer install, ``canceled`` for
    a rollback of the same model, which also stops a running transfer)."""

    kind: Literal["result"] = "result"
    outcome: Literal["committed", "rolled_back", "failed", "superseded"]
    model: str
    version: str | None = None
    code: str | None = None
    reason: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    transfer: TransferCounters | None = None


class RejectedEvent(_Event):
    """A message the device refused; ``code`` says why in one word, ``reason`` in a sentence."""

    kind: Literal["rejected"] = "rejected"
    code: str
    reason: str
    topic: str


Event = Annotated[
    Union[AcceptedEvent, ProgressEvent, NeedEvent, ResultEvent, RejectedEvent], Field(discriminator="kind")
]
_EVENT = TypeAdapter(Event)


class DriftChannel(_Lenient):
    """One input channel (group) of a model's drift window (``agent/drift.py``)."""

    tensor: str
    channel: int
    level: str
    psi: float
    out_of_range: float = 0.0
    nonfinite: float = 0.0
    mean: float | None = None
    reference_mean: float | None = None


class DriftStatus(_Lenient):
    """A model's live inputs against its bundle's reference statistics: ``collecting`` until the window
    holds enough values, then ``ok``, ``warn`` or ``alarm``, with the worst channels (added in 0.1)."""

    level: Literal["collecting", "ok", "warn", "alarm"]
    window: int = 0
    observed: int = 0
    worst: list[DriftChannel] = Field(default_factory=list)


class CaptureStatus(_Lenient):
    """The device's capture ring buffer (``agent/capture.py``): what waits for ``fleet capture pull``, and
    what a full buffer dropped (added in 0.1)."""

    records: int = 0
    bytes: int = 0
    captured: int = 0
    uploaded: int = 0
    dropped: int = 0


class ModelStatus(_Lenient):
    active: str | None = None
    previous: str | None = None
    serving: str | None = None
    highest_version: str | None = None
    bundle: str | None = None
    drift: DriftStatus | None = None  # None: no reference statistics in the bundle, or drift off


class TransferStatus(_Lenient):
    command_id: str
    bundle: str
    held_bytes: int
    total_bytes: int


class DeviceHealth(_Lenient):
    """What the device sees of its own health (``agent/health.py``; added in 0.1): ``ready`` is what its
    ``/v2/health/ready`` answers, ``alarms`` the self-test and inference-error alarms; ``ok`` is both fine."""

    ok: bool
    ready: bool
    unready: dict[str, str] = Field(default_factory=dict)  # model -> why it does not serve
    alarms: list[str] = Field(default_factory=list)


class TrustStatus(_Lenient):
    """Which trust root a device holds: its version, when it expires, and whether it has."""

    version: int
    expires: str
    expired: bool = False


class DeviceState(_Lenient):
    """The retained state of a device; its last will is the same with ``online: false``."""

    v: Literal[1] = 1
    kind: Literal["state"] = "state"
    device: str
    online: bool
    at: datetime
    labels: dict[str, str] = Field(default_factory=dict)
    groups: list[str] = Field(default_factory=list)
    targets: list[str] | None = None
    models: dict[str, ModelStatus] = Field(default_factory=dict)
    transfer: TransferStatus | None = None
    protocol: str | None = None
    agent_version: str | None = None
    dropped_events: int = 0
    notices: list[str] = Field(default_factory=list)  # what the device had to repair or cannot do (added in 0.1)
    health: DeviceHealth | None = None  # None: an agent that does not report it
    trust: TrustStatus | None = None  # the trust root the device holds (None: an agent before 0.2)
    capture: CaptureStatus | None = None  # the capture ring buffer (None: capture off)

    @field_validator("groups")
    @classmethod
    def _sorted(cls, value: list[str]) -> list[str]:
        return sorted(value)


# --- data capture upload (docs/capture.md) ---------------------------------------------------------

MAX_CAPTURE_HAVE = 256


class CaptureHave(_Strict):
    """A record the operator holds part of: the chunk positions it has (the device sends the rest)."""

    seq: int = Field(ge=1)
    sha256: Sha256
    chunks: list[int] = Field(default_factory=list, max_length=MAX_CHUNKS)


class CaptureRecordRef(_Strict):
    seq: int = Field(ge=1)
    sha256: Sha256


class CapturePull(_Strict):
    """Operator → device: upload the captured records (oldest first), skipping the chunks in ``have``."""

    kind: Literal["capture_pull"] = "capture_pull"
    id: CommandId
    device: DeviceId
    issued_at: datetime
    expires_at: datetime
    have: list[CaptureHave] = Field(default_factory=list, max_length=MAX_CAPTURE_HAVE)


class CaptureAck(_Strict):
    """Operator → device: these records are stored on the operator's side; delete them."""

    kind: Literal["capture_ack"] = "capture_ack"
    id: CommandId
    device: DeviceId
    issued_at: datetime
    records: list[CaptureRecordRef] = Field(min_length=1, max_length=1024)


class CaptureConfig(_Strict):
    """Operator → device, retained: capture ``model`` with ``settings`` (the fields of ``[capture.models.NAME]``
    in ``agent.toml``), or stop (None). Honoured only where the device's own ``[capture] enabled`` is true and
    its ``agent.toml`` does not set that model itself; ``seq`` only goes forward per model."""

    kind: Literal["capture_config"] = "capture_config"
    id: CommandId
    device: DeviceId
    issued_at: datetime
    seq: int = Field(ge=1)
    model: str = Field(min_length=1, max_length=128)
    settings: dict[str, Any] | None = None


CaptureControl = Annotated[Union[CapturePull, CaptureAck, CaptureConfig], Field(discriminator="kind")]


class SignedCaptureControl(_Strict):
    """What goes on ``capture/ctl``: a pull or an ack, signed like a command (the ``command`` role), since a
    pull makes the device send data and an ack makes it delete some."""

    v: Literal[1] = 1
    message: CaptureControl
    signatures: list[SignatureEntry] = Field(default_factory=list, max_length=16)

    def signed_bytes(self) -> bytes:
        return canonical_json(self.message.model_dump(mode="json"))

    def trust_signatures(self) -> list[Signature]:
        return [Signature.from_json(entry.model_dump()) for entry in self.signatures]


class CaptureChunk(_Lenient):
    """Device → operator: chunk ``position`` of ``count`` of record ``seq`` (``data`` base64)."""

    v: Literal[1] = 1
    kind: Literal["capture_chunk"] = "capture_chunk"
    device: str
    pull: str
    seq: int
    sha256: str
    size: int
    chunk_size: int
    position: int
    count: int
    data: str


class CaptureEnd(_Lenient):
    """Device → operator: every record held was sent for this pull; ``held`` remain unacknowledged."""

    v: Literal[1] = 1
    kind: Literal["capture_end"] = "capture_end"
    device: str
    pull: str
    held: int
    dropped: int = 0


_CAPTURE = TypeAdapter(Annotated[Union[CaptureChunk, CaptureEnd], Field(discriminator="kind")])


def sign_capture_control(message: CapturePull | CaptureAck | CaptureConfig, keys: Iterable[SigningKey]) -> SignedCaptureControl:
    data = canonical_json(message.model_dump(mode="json"))
    signatures = [SignatureEntry(**sign("command", data, key).to_json()) for key in keys]
    return SignedCaptureControl(message=message, signatures=signatures)


def parse_capture_control(payload: bytes) -> SignedCaptureControl:
    return _validate(SignedCaptureControl, _load(payload, "capture control", MAX_COMMAND_BYTES), "capture control")


def parse_capture_message(payload: bytes) -> CaptureChunk | CaptureEnd:
    raw = _load(payload, "capture message", MAX_EVENT_BYTES * 2)
    try:
        return _CAPTURE.validate_python(raw)
    except ValidationError as exc:
        raise MalformedMessageError(f"capture message does not match its schema: {validation_summary(exc)}") from exc


# --- encoding and parsing ------------------------------------------------------------------------


def encode(message: BaseModel) -> bytes:
    """The wire bytes of a message: canonical JSON (sorted keys, compact)."""
    return canonical_json(message.model_dump(mode="json"))


def command_bytes(command: InstallCommand | RollbackCommand) -> bytes:
    """The bytes a command signature covers."""
    return canonical_json(command.model_dump(mode="json"))


M = TypeVar("M", bound=BaseModel)


def _load(payload: bytes, what: str, limit: int) -> dict[str, Any]:
    if len(payload) > limit:
        raise MalformedMessageError(f"{what} is {len(payload)} bytes, more than the {limit} allowed")
    try:
        raw = json.loads(payload.decode("utf-8"), parse_constant=reject_json_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; deep nesting
        raise MalformedMessageError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise MalformedMessageError(f"{what} must be a JSON object")
    if raw.get("v") != PROTOCOL_VERSION:
        raise MalformedMessageError(
            f"{what} speaks protocol version {raw.get('v')!r}; this edgepack speaks {PROTOCOL_VERSION} — upgrade it"
        )
    return raw


def _validate(model: type[M], raw: dict[str, Any], what: str) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise MalformedMessageError(f"{what} does not match its schema: {validation_summary(exc)}") from exc


def parse_command(payload: bytes) -> SignedCommand:
    """Parse a command message; raises MalformedMessageError or UnknownCommandError (not signature checks)."""
    raw = _load(payload, "command", MAX_COMMAND_BYTES)
    command = raw.get("command")
    if not isinstance(command, dict):
        raise MalformedMessageError("command message has no 'command' object")
    action = command.get("action")
    if action not in COMMAND_ACTIONS:
        raise UnknownCommandError(f"unknown command {action!r}; this agent knows {', '.join(COMMAND_ACTIONS)}")
    return _validate(SignedCommand, raw, f"{action} command")


def parse_index(payload: bytes) -> ChunkIndex:
    """Parse a chunk index and check that its sizes describe one file; raises IndexMismatchError if not."""
    index = _validate(ChunkIndex, _load(payload, "chunk index", MAX_INDEX_BYTES), "chunk index")
    problem = index.inconsistency()
    if problem:
        raise IndexMismatchError(f"chunk index of bundle {index.bundle[:12]}… lies about sizes: {problem}")
    return index


def parse_event(payload: bytes) -> AcceptedEvent | ProgressEvent | NeedEvent | ResultEvent | RejectedEvent:
    raw = _load(payload, "event", MAX_EVENT_BYTES)
    try:
        return _EVENT.validate_python(raw)
    except ValidationError as exc:
        raise MalformedMessageError(f"event does not match its schema: {validation_summary(exc)}") from exc


def parse_trust_update(payload: bytes) -> TrustUpdate:
    """Parse a ``trust`` message (or file); the roots in it are checked by ``TrustStore.update``."""
    return _validate(TrustUpdate, _load(payload, "trust update", MAX_TRUST_BYTES), "trust update")


def trust_update(roots: Sequence[bytes]) -> TrustUpdate:
    """The ``trust`` message carrying ``roots`` (TUF root documents as bytes, oldest first)."""
    return TrustUpdate(roots=[json.loads(r) for r in roots])


def parse_state(payload: bytes) -> DeviceState:
    return _validate(DeviceState, _load(payload, "device state", MAX_EVENT_BYTES), "device state")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- making and checking commands ----------------------------------------------------------------


def new_command_fields(
    to: CommandTarget, *, ttl: timedelta | None = DEFAULT_COMMAND_TTL, seq: int | None = None
) -> dict[str, Any]:
    """Fresh id, sequence and times for a command to ``to``.

    ``seq`` comes from the fleet journal's counter (``Journal.next_command_seq``); without one (a test, a
    one-off tool) it falls back to the issue time in µs.
    """
    issued = utc_now()
    return {
        "id": uuid.uuid4().hex,
        "seq": seq if seq is not None else _next_seq(),
        "issued_at": issued,
        "expires_at": issued + ttl if ttl is not None else None,
        "to": to,
    }


class _SeqClock:
    """Microseconds since the epoch, strictly increasing within this process (thread-safe)."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self._last = max(time.time_ns() // 1000, self._last + 1)
            return self._last


_next_seq = _SeqClock()


def sign_command(command: InstallCommand | RollbackCommand, keys: Iterable[SigningKey]) -> SignedCommand:
    data = command_bytes(command)
    signatures = [SignatureEntry(**sign("command", data, key).to_json()) for key in keys]
    return SignedCommand(command=command, signatures=signatures)


def verify_command(signed: SignedCommand, trust: TrustStore) -> list[str]:
    """Check the command's signatures against the trust store's ``command`` role; returns the key ids."""
    return trust.verify("command", signed.signed_bytes(), signed.trust_signatures(), role="command")


_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (SignatureInvalidError, "signature"),
    (UnknownKeyError, "untrusted"),
    (ThresholdNotMetError, "untrusted"),
    (RevokedKeyError, "untrusted"),
    (ExpiredBundleError, "expired"),
    (RollbackRefusedError, "rollback_refused"),
    (TargetMismatchError, "target"),
    (SelfTestError, "selftest"),
    (BundleError, "bundle"),
)


def error_code(exc: BaseException) -> str:
    """The one-word code an event gives for ``exc`` (docs/protocol.md lists them).

    The most specific cause wins: an InstallError raised ``from`` a TargetMismatchError gives ``target``.
    """
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__
    for link in reversed(chain):
        code = getattr(link, "code", None)
        if isinstance(code, str):
            return code
        for kind, name in _CODES:
            if isinstance(link, kind):
                return name
    if isinstance(exc, EdgepackError):
        return type(exc).__name__.removesuffix("Error").lower()
    return "internal"


def positions_of(index: ChunkIndex, hashes: Sequence[str]) -> list[int]:
    """The first position in ``index`` of each chunk hash in ``hashes`` (for a NeedEvent)."""
    first: dict[str, int] = {}
    for position, ref in enumerate(index.chunks):
        first.setdefault(ref.sha256, position)
    return sorted(first[h] for h in hashes if h in first)
