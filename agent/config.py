"""The agent's configuration: one pydantic model, read from TOML, every field also settable by a flag.

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
"""

from __future__ import annotations

import sys
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

DEFAULT_STATE_DIR = Path("/var/lib/edgepack")
DEFAULT_TRUST_DIR = Path("/etc/edgepack/trust")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuntimeSettings(_Section):
    threads: int | None = Field(default=None, ge=1)
    allow_accelerators: bool = True
    cache_dir: Path | None = None

    def options(self, state_dir: Path) -> RuntimeOptions:
        return RuntimeOptions(
            threads=self.threads,
            allow_accelerators=self.allow_accelerators,
            cache_dir=self.cache_dir or state_dir / "cache",
        )


class BrokerSettings(_Section):
    url: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None
    prefix: str = "edgepack"
    protocol: str = Field(default="auto", pattern="^(auto|3.1.1|5)$")
    keepalive: int = Field(default=30, ge=5)
    max_buffered_events: int = Field(default=1000, ge=1)


class LinkSettings(_Section):
    """The MQTT link's tuning; the field names are :class:`edgepack.agent.link.LinkOptions`'s, and so are
    the defaults (a test keeps the two in step)."""

    stall_s: float = Field(default=5.0, gt=0)
    need_max_s: float = Field(default=60.0, gt=0)
    progress_interval_s: float = Field(default=0.5, gt=0)
    max_rate: int | None = Field(default=None, ge=1024)  # bytes/s; "500k" and "2M" are read too
    session_expiry_s: int = Field(default=3600, ge=0)
    reconnect_min_s: int = Field(default=1, ge=1)
    reconnect_max_s: int = Field(default=30, ge=1)
    will_delay_s: int = Field(default=0, ge=0)
    event_expiry_s: int = Field(default=86400, ge=1)
    receive_maximum: int = Field(default=16, ge=1, le=65535)

    @field_validator("max_rate", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return parse_size(value, "link.max_rate")
            except ConfigError as exc:
                raise ValueError(str(exc)) from exc
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> LinkSettings:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) is below reconnect_min_s ({self.reconnect_min_s})"
            )
        if self.need_max_s < self.stall_s:
            raise ValueError(f"need_max_s ({self.need_max_s}) is below stall_s ({self.stall_s})")
        return self


class AgentConfig(_Section):
    device_id: str = Field(default="edge-device", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    targets: list[str] | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    state_dir: Path = DEFAULT_STATE_DIR
    trust_dir: Path = DEFAULT_TRUST_DIR
    listen: str = "127.0.0.1:8000"
    token: str | None = None
    max_body_mb: float = Field(default=64, gt=0)
    disk_quota_mb: float | None = Field(default=None, gt=0)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    link: LinkSettings = Field(default_factory=LinkSettings)

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
