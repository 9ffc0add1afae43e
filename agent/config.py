"""The agent's configuration: one pydantic model, read from TOML; the ``agent run`` flags derive from it.

Example ``agent.toml`` (``firmware-images/*/agent.toml`` ship one per device class)::

    device_id = "cam-0042"
    targets = ["jetson-orin"]            # bundles for other targets are refused
    labels = { site = "plant-3", line = "2" }
    state_dir = "/var/lib/edgepack"
    trust_dir = "/etc/edgepack/trust"
    listen = "127.0.0.1:8000"
    # token = "..."                      # bearer token for the local API (optional)

    [runtime]
    threads = 2
    allow_accelerators = true

    [broker]
    url = "mqtts://broker.example:8883"
    ca = "/etc/edgepack/ca.pem"
    cert = "/etc/edgepack/device.pem"
    key = "/etc/edgepack/device.key"
    prefix = "edgepack"

    [link]                               # how bundles come in over MQTT (all optional)
    max_rate = "500k"                    # bytes/s of chunks taken in: a metered or shared uplink
    stall_s = 5.0                        # no chunk for this long while some are missing: ask for them
    session_expiry_s = 3600              # MQTT 5: the broker keeps the session across a disconnect

Precedence: defaults < the TOML file < command-line flags.

**Every setting is defined once, here.** A field's ``description`` is its documentation and its flag's help;
a field marked with :func:`flag` gets an ``edgepack agent run`` option (:func:`flag_specs` lists them, the CLI
builds its options from that list and ``agent/daemon.py`` maps flag values back to dotted keys with it).
The MQTT link takes :class:`LinkSettings` as it is (``edgepack.agent.link.LinkOptions`` is this class).

**Device id.** Two devices with one id knock each other off the broker, so there is no default id: when
``device_id`` is not set, :func:`resolve_device_id` derives ``edge-<12 hex>`` from ``/etc/machine-id``
(sha256, so the machine id itself is not published); with neither, the agent serves but does not join a
broker.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgepack.errors import ConfigError
from edgepack.runtimes.base import RuntimeOptions
from edgepack.units import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/edgepack")
DEFAULT_TRUST_DIR = Path("/etc/edgepack/trust")
MACHINE_ID = Path("/etc/machine-id")
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
PACKET_MARGIN = 64 << 10  # MQTT 5 Maximum Packet Size = the largest chunk + this (topic, properties, a command)
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 256, 16 << 20  # edgepack.protocol's bounds (not imported: no paho/pydantic cycle)


def flag(name: str, *, dest: str | None = None, envvar: str | None = None, kind: type | None = None) -> dict[str, Any]:
    """``json_schema_extra`` that gives a field an ``agent run`` option: ``name`` (e.g. ``--max-rate``; a bool
    takes ``--x/--no-x``), ``dest`` (the Python name, default the field's), ``kind`` (the flag's type when it
    is not the field's, e.g. ``str`` for sizes such as ``500k``)."""
    return {"flag": {"name": name, "dest": dest, "envvar": envvar, "kind": kind.__name__ if kind else None}}


def _size_or_value(value: Any, what: str) -> Any:
    if isinstance(value, str):
        try:
            return parse_size(value, what)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuntimeSettings(_Section):
    threads: int | None = Field(
        default=None, ge=1, description="Runtime intra-op threads.", json_schema_extra=flag("--threads")
    )
    allow_accelerators: bool = Field(
        default=True,
        description="Let runtimes use GPUs/NPUs (default: yes).",
        json_schema_extra=flag("--accelerators/--no-accelerators", dest="accelerators"),
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Runtime cache directory (default STATE/cache).",
        json_schema_extra=flag("--runtime-cache", dest="runtime_cache"),
    )
    thread_budget: int | None = Field(
        default=None,
        ge=1,
        description="Threads all loaded models share (runs wait for their share; no spinning); default: unbounded.",
        json_schema_extra=flag("--thread-budget"),
    )

    def options(self, state_dir: Path) -> RuntimeOptions:
        return RuntimeOptions(
            threads=self.threads,
            allow_accelerators=self.allow_accelerators,
            cache_dir=self.cache_dir or state_dir / "cache",
        )


class BrokerSettings(_Section):
    url: str | None = Field(
        default=None,
        description="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]; none: serve from the store only.",
        json_schema_extra=flag("--broker", dest="broker"),
    )
    ca: Path | None = Field(default=None, description="CA certificate for mqtts://.", json_schema_extra=flag("--ca"))
    cert: Path | None = Field(
        default=None, description="Client certificate for mqtts://.", json_schema_extra=flag("--cert")
    )
    key: Path | None = Field(
        default=None, description="Client certificate's private key.", json_schema_extra=flag("--key")
    )
    username: str | None = Field(default=None, description="Broker user name.", json_schema_extra=flag("--username"))
    password: str | None = Field(
        default=None,
        description="Broker password.",
        json_schema_extra=flag("--password", envvar="EDGEPACK_BROKER_PASSWORD"),
    )
    prefix: str = Field(
        default="edgepack", description="Topic prefix (default edgepack).", json_schema_extra=flag("--prefix")
    )
    protocol: str = Field(
        default="auto",
        pattern="^(auto|3.1.1|5)$",
        description="auto (MQTT 5, else 3.1.1), 3.1.1 or 5.",
        json_schema_extra=flag("--protocol"),
    )
    keepalive: int = Field(
        default=30, ge=5, description="MQTT keepalive in seconds.", json_schema_extra=flag("--keepalive")
    )
    max_buffered_events: int = Field(
        default=1000, ge=1, description="Events kept while offline.", json_schema_extra=flag("--max-buffered-events")
    )


class LinkSettings(_Section):
    """The MQTT link's tuning (``edgepack.agent.link.LinkOptions`` is this class); tests shorten the waits."""

    stall_s: float = Field(
        default=5.0,
        gt=0,
        description="Seconds without a chunk while some are asked for before asking again (a need).",
        json_schema_extra=flag("--stall", dest="stall_s"),
    )
    need_max_s: float = Field(default=60.0, gt=0, description="The wait between needs doubles up to this.")
    max_unanswered_needs: int = Field(
        default=6,
        ge=1,
        description="Needs in a row answered by nothing after which a transfer fails as stalled.",
    )
    deadline_min_s: float = Field(
        default=900.0, gt=0, description="Every job's deadline is at least this (plus size / deadline_rate)."
    )
    deadline_rate: int = Field(
        default=16 << 10,
        ge=1,
        description="Bytes/s a transfer is given at least (the deadline); capped at half of max_rate.",
    )
    progress_interval_s: float = Field(default=0.5, gt=0, description="Progress events at most this often.")
    max_rate: int | None = Field(
        default=None,
        ge=1024,
        description="Cap on chunk intake, bytes/s (e.g. 500k, 2M); none: as fast as the broker sends.",
        json_schema_extra=flag("--max-rate", kind=str),
    )
    fetch_window: int = Field(
        default=16, ge=1, le=1024, description="Chunks asked for (subscribed) at once while a transfer runs."
    )
    max_chunk_size: int = Field(
        default=4 << 20,
        ge=MIN_CHUNK_SIZE,
        le=MAX_CHUNK_SIZE,
        description="Largest chunk (and index) taken; MQTT 5 Maximum Packet Size is this + 64 KiB.",
    )
    session_expiry_s: int = Field(
        default=3600,
        ge=0,
        description="MQTT 5 session expiry in seconds (default 3600).",
        json_schema_extra=flag("--session-expiry", dest="session_expiry_s"),
    )
    reconnect_min_s: int = Field(default=1, ge=1, description="Reconnect backoff starts here.")
    reconnect_max_s: int = Field(default=30, ge=1, description="Reconnect backoff grows up to this.")
    will_delay_s: int = Field(default=0, ge=0, description="MQTT 5: a reconnect within this delay is not offline.")
    state_interval_s: float = Field(
        default=0.0, ge=0, description="Publish the retained state this often even when nothing changed (a "
        "heartbeat for brokers that give no retained messages to wildcard subscriptions, e.g. RabbitMQ 3.x; "
        "docs/scaling.md); 0: only when it changes.",
    )  # fmt: skip
    event_expiry_s: int = Field(default=86400, ge=1, description="MQTT 5: events nobody picked up expire.")
    receive_maximum: int = Field(
        default=16, ge=1, le=65535, description="MQTT 5: chunks in flight to the device (memory, what a drop loses)."
    )

    @field_validator("max_rate", "deadline_rate", "max_chunk_size", mode="before")
    @classmethod
    def _size(cls, value: Any, info: Any) -> Any:
        return _size_or_value(value, f"link.{info.field_name}")

    @model_validator(mode="after")
    def _backoff_order(self) -> LinkSettings:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) is below reconnect_min_s ({self.reconnect_min_s})"
            )
        if self.need_max_s < self.stall_s:
            raise ValueError(f"need_max_s ({self.need_max_s}) is below stall_s ({self.stall_s})")
        return self

    @property
    def max_packet_size(self) -> int:
        """MQTT 5 Maximum Packet Size (CONNECT): the broker drops larger messages before the device reads them."""
        return self.max_chunk_size + PACKET_MARGIN

    def deadline_s(self, size: int | None) -> float:
        """A job's deadline: ``deadline_min_s`` + ``size`` at ``deadline_rate`` (at most half of ``max_rate``)."""
        rate = float(self.deadline_rate)
        if self.max_rate:
            rate = min(rate, self.max_rate / 2)
        return self.deadline_min_s + (size or 0) / rate


class DriftSettings(_Section):
    """Live statistics against the bundle's reference statistics (``docs/capture.md``); on by default."""

    enabled: bool = Field(default=True, description="Compare live inputs with the bundle's reference statistics.")
    every: int = Field(default=1, ge=1, description="Look at every k-th request.")
    budget_ms_per_s: float = Field(
        default=20.0, gt=0, description="Milliseconds per second of one core the statistics may take at most."
    )
    window: int = Field(default=1024, ge=16, description="Requests looked at that the sliding window holds.")
    max_values: int = Field(default=4096, ge=16, description="Values per tensor binned from one request.")
    min_values: int = Field(
        default=250, ge=1, description="Values per channel the window needs before it judges (PSI bias)."
    )
    psi_warn: float = Field(default=0.1, gt=0, description="PSI from which a channel warns.")
    psi_alarm: float = Field(default=0.25, gt=0, description="PSI from which a channel alarms.")
    range_warn: float = Field(default=0.05, gt=0, le=1, description="Out-of-range share from which it warns.")
    range_alarm: float = Field(default=0.2, gt=0, le=1, description="Out-of-range share from which it alarms.")
    nonfinite_warn: float = Field(default=0.001, gt=0, le=1, description="Extra NaN/inf share that warns.")
    nonfinite_alarm: float = Field(default=0.01, gt=0, le=1, description="Extra NaN/inf share that alarms.")
    check_s: float = Field(
        default=0.5, ge=0, description="Seconds between judgements of the level (state updates, capture rule)."
    )
    queue: int = Field(default=32, ge=1, description="Requests waiting for the statistics thread; more are skipped.")
    queue_mb: float = Field(default=16.0, gt=0, description="Their tensor MiB at most; more are skipped.")

    @model_validator(mode="after")
    def _order(self) -> DriftSettings:
        for what in ("psi", "range", "nonfinite"):
            if getattr(self, f"{what}_alarm") < getattr(self, f"{what}_warn"):
                raise ValueError(f"{what}_alarm is below {what}_warn")
        return self


class CaptureModelSettings(_Section):
    """What one model may capture: nothing leaves the device unless named here (privacy: per input)."""

    inputs: list[str] = Field(default_factory=list, description="Inputs whose values may be stored.")
    outputs: bool = Field(default=False, description="Store the outputs' values too.")
    stats_only: bool = Field(
        default=False, description="Store per-channel statistics of the named tensors instead of their values."
    )
    sample_rate: float = Field(default=1.0, gt=0, le=1, description="Share of requests the rules look at.")
    random_share: float = Field(default=0.0, ge=0, le=1, description="Rule: capture this share at random.")
    when_drift: str = Field(
        default="off", pattern="^(off|warn|alarm)$", description="Rule: capture while drift is at least this."
    )
    top_score_below: float | None = Field(
        default=None, description="Rule: capture when the highest output score is below this."
    )

    @model_validator(mode="after")
    def _useful(self) -> CaptureModelSettings:
        if not self.random_share and self.when_drift == "off" and self.top_score_below is None:
            raise ValueError("no rule: set random_share, when_drift or top_score_below")
        if not self.inputs and not self.outputs:
            raise ValueError("name the inputs that may be stored (inputs = [\"x\"]) or set outputs = true")
        return self


class CaptureSettings(_Section):
    """Data capture (``[capture]``): off by default; ``[capture.models.NAME]`` opts a model in."""

    enabled: bool = Field(default=False, description="Capture samples of the models listed under models.")
    directory: Path | None = Field(default=None, description="Ring buffer folder (default STATE/capture).")
    max_bytes: int = Field(default=64 << 20, ge=4096, description="Ring buffer size bound (e.g. 64M).")
    max_count: int = Field(default=1000, ge=1, description="Ring buffer record count bound.")
    chunk_size: int = Field(default=64 << 10, ge=MIN_CHUNK_SIZE, le=1 << 20, description="Upload chunk size.")
    ack_timeout_s: float = Field(
        default=30.0, gt=0, description="A record sent and not acknowledged this long is sent again."
    )
    models: dict[str, CaptureModelSettings] = Field(default_factory=dict)

    @field_validator("max_bytes", "chunk_size", mode="before")
    @classmethod
    def _size(cls, value: Any, info: Any) -> Any:
        return _size_or_value(value, f"capture.{info.field_name}")


class ModelServingSettings(_Section):
    """How one model is served (``[models.NAME]``): its threads, its concurrency, dynamic batching."""

    threads: int | None = Field(default=None, ge=1, description="This model's intra-op threads (default runtime.threads).")
    max_concurrency: int | None = Field(
        default=None, ge=1, description="Requests this model runs at once (default: as many as the thread budget fits)."
    )
    max_batch_size: int = Field(default=1, ge=1, description="Rows per batched run; 1: no dynamic batching.")
    max_queue_delay_us: int = Field(default=500, ge=0, description="Microseconds a request may wait for a batch.")
    preferred_batch_sizes: list[int] = Field(default_factory=list, description="Batch sizes to run at once when met.")
    batching: bool | None = Field(
        default=None, description="Batch (when max_batch_size > 1); default: yes where the device has 2+ cores."
    )

    @model_validator(mode="after")
    def _sizes(self) -> ModelServingSettings:
        bad = [n for n in self.preferred_batch_sizes if not 1 <= n <= self.max_batch_size]
        if bad:
            raise ValueError(f"preferred_batch_sizes {bad} are not between 1 and max_batch_size ({self.max_batch_size})")
        return self


class AgentConfig(_Section):
    device_id: str | None = Field(
        default=None,
        pattern=DEVICE_ID_PATTERN,
        description="This device's id (topic name); default edge-<hash of /etc/machine-id>.",
        json_schema_extra=flag("--device-id"),
    )
    targets: list[str] | None = Field(
        default=None,
        description="Target(s) this device accepts; repeatable.",
        json_schema_extra=flag("--target", dest="targets"),
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Label KEY=VALUE (groups come from labels); repeatable.",
        json_schema_extra=flag("--label", dest="labels"),
    )
    state_dir: Path = Field(
        default=DEFAULT_STATE_DIR,
        description="State directory (bundles, journal, transfers).",
        json_schema_extra=flag("--state", dest="state"),
    )
    trust_dir: Path = Field(
        default=DEFAULT_TRUST_DIR, description="Trust store directory.", json_schema_extra=flag("--trust", dest="trust")
    )
    listen: str = Field(
        default="127.0.0.1:8000",
        description="Local API address HOST:PORT (default 127.0.0.1:8000).",
        json_schema_extra=flag("--listen"),
    )
    token: str | None = Field(
        default=None,
        description="Bearer token for the local API.",
        json_schema_extra=flag("--token", envvar="EDGEPACK_TOKEN"),
    )
    max_body_mb: float = Field(
        default=64, gt=0, description="Largest local API request body.", json_schema_extra=flag("--max-body-mb")
    )
    insecure_listen: bool = Field(
        default=False,
        description="Let the local API listen beyond loopback without a token (only on a trusted network).",
        json_schema_extra=flag("--insecure-listen/--no-insecure-listen", dest="insecure_listen"),
    )
    listen_unix: Path | None = Field(
        default=None,
        description="Also serve the local API on this Unix-domain socket.",
        json_schema_extra=flag("--listen-unix"),
    )
    listen_unix_mode: int = Field(
        default=0o600, ge=0, le=0o777, description="File mode of the Unix socket: 0o600, or 0o660 for a group."
    )
    grpc_port: int | None = Field(
        default=None,
        ge=0,
        lt=65536,
        description="Also serve KServe v2 gRPC on this port, on the listen host (default: no gRPC).",
        json_schema_extra=flag("--grpc-port"),
    )
    max_concurrent_requests: int | None = Field(
        default=None,
        ge=1,
        description="Inference requests in flight before 503 + Retry-After (default: 4 per inference thread).",
        json_schema_extra=flag("--max-concurrent-requests"),
    )
    max_queued_mb: float | None = Field(
        default=None,
        gt=0,
        description="Body MiB held by in-flight requests before 503 (default: 4 bodies at the cap, <= 1/8 of RAM).",
        json_schema_extra=flag("--max-queued-mb"),
    )
    disk_quota_mb: float | None = Field(
        default=None, gt=0, description="Refuse transfers beyond this.", json_schema_extra=flag("--disk-quota-mb")
    )
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    link: LinkSettings = Field(default_factory=LinkSettings)
    models: dict[str, ModelServingSettings] = Field(default_factory=dict)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    capture: CaptureSettings = Field(default_factory=CaptureSettings)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8000)")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def runtime_options(self) -> RuntimeOptions:
        return self.runtime.options(self.state_dir)


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Read ``path`` (TOML; None for defaults only) and apply ``overrides`` (dotted keys allowed)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read agent config {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            section = section.setdefault(part, {})
        section[leaf] = value
    try:
        return AgentConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"agent config{f' {path}' if path else ''} is invalid: {problems}") from exc


# --- flags, derived from the fields above ---------------------------------------------------------


@dataclass(frozen=True)
class FlagSpec:
    """One ``agent run`` option: ``name`` on the command line, ``dest`` in Python, ``key`` in the config."""

    name: str
    dest: str
    key: str
    help: str
    kind: type  # str, int, float, bool or Path
    multiple: bool = False
    envvar: str | None = None


_KINDS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path}


def _flag_kind(annotation: Any) -> tuple[type, bool]:
    """(scalar type, repeatable) of a field's annotation: ``X | None`` → X; ``list[X]``/``dict`` → repeatable."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_kind(inner)
    if origin is list:
        return typing.get_args(annotation)[0], True
    if origin is dict:
        return str, True  # KEY=VALUE pairs
    return annotation, False


def flag_specs(model: type[BaseModel] = AgentConfig, prefix: str = "") -> tuple[FlagSpec, ...]:
    """Every field marked with :func:`flag`, sections included, in definition order."""
    specs: list[FlagSpec] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            specs.extend(flag_specs(annotation, f"{prefix}{name}."))
            continue
        extra = info.json_schema_extra
        marker = extra.get("flag") if isinstance(extra, dict) else None
        if not isinstance(marker, dict):
            continue
        kind, multiple = _flag_kind(annotation)
        if marker.get("kind"):
            kind = _KINDS[str(marker["kind"])]
        specs.append(
            FlagSpec(
                name=str(marker["name"]),
                dest=str(marker.get("dest") or name),
                key=f"{prefix}{name}",
                help=info.description or "",
                kind=kind,
                multiple=multiple,
                envvar=marker.get("envvar"),  # type: ignore[arg-type]
            )
        )
    return tuple(specs)


# --- the device id ---------------------------------------------------------------------------------


def derive_device_id(machine_id: Path = MACHINE_ID) -> str | None:
    """``edge-<first 12 hex of sha256(machine-id)>``, or None when there is no usable machine id."""
    try:
        text = machine_id.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text or set(text) == {"0"}:  # systemd writes "uninitialized" or zeros on first boot in some images
        return None
    if text == "uninitialized":
        return None
    return f"edge-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def resolve_device_id(config: AgentConfig, machine_id: Path = MACHINE_ID) -> tuple[AgentConfig, str]:
    """The config with a device id and where it came from: ``"config"``, ``"machine-id"`` or ``"none"``.

    Logs which, so that a fleet log says why a device has the name it has.
    """
    if config.device_id:
        return config, "config"
    derived = derive_device_id(machine_id)
    if derived is None:
        log.warning(
            "no device_id configured and none derivable from %s: set device_id in agent.toml or --device-id "
            "(the agent serves, but joins no broker without an id)",
            machine_id,
        )
        return config, "none"
    log.info("device id %s derived from %s (set device_id or --device-id to choose one)", derived, machine_id)
    return config.model_copy(update={"device_id": derived}), "machine-id"
