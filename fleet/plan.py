"""A rollout plan: who gets the bundle when, what counts as success, and when to stop.

Borrowed from AWS IoT Jobs (``jobExecutionsRolloutConfig``, ``abortConfig``, ``timeoutConfig``, retries),
Greengrass v2 (roll back on failure) and Mender (phased batches), and written to the journal as JSON so a
resumed operator follows the same plan:

- **waves** ``1,10%,50%,100%``: cumulative sizes, absolute or a share of the group (rounded up); the
  first is the canary. A wave starts when the previous one has ended and passed the success gate.
- **rate** ``50/min``, or **exponential** ``BASE,FACTOR``: no waves; at most that many devices notified
  per minute, the exponential rate multiplied by FACTOR each time as many devices as the current rate
  have succeeded (IoT Jobs' ``rateIncreaseCriteria.numberOfSucceededThings``).
- **success gate** ``95%``: the share of a wave's executed devices that must succeed.
- **abort rules** ``TYPE:PCT:MIN_EXECUTED`` (TYPE failed, rejected, timed_out or all): abort as soon as at
  least MIN devices have executed and PCT % of them ended in TYPE.
- **timeout** per device (notified → result), **retries** (of failed and timed-out devices), **soak**
  (after commit the device must stay online, on the new version and healthy this long), **rollback on
  abort**, and **offline wait** (how long the rollout stays open for members still offline once the rest
  are done).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from edgepack.errors import ConfigError

FAILURE_TYPES = ("failed", "rejected", "timed_out", "all")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, what: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``500ms`` -> seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ConfigError(f"{what} {text!r} is not a duration (e.g. 30s, 10m, 2h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_percent(text: str, what: str) -> float:
    value = str(text).strip().removesuffix("%")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a percentage (e.g. 95%)") from None
    if not 0 <= number <= 100:
        raise ConfigError(f"{what} {text!r} must be between 0% and 100%")
    return number


@dataclass(frozen=True)
class Wave:
    """A cumulative wave size: ``count`` devices, or ``percent`` of the group."""

    count: int | None = None
    percent: float | None = None

    def size(self, total: int) -> int:
        if self.count is not None:
            return min(total, self.count)
        return min(total, math.ceil(total * (self.percent or 0) / 100 - 1e-9))

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent:g}%"


def parse_waves(text: str) -> list[Wave]:
    waves = []
    for term in (t.strip() for t in text.split(",")):
        if term.endswith("%"):
            pct = parse_percent(term, "--waves size")
            if pct <= 0:
                raise ConfigError(f"--waves size {term!r} must be above 0%")
            waves.append(Wave(percent=pct))
        elif term.isdigit() and int(term) > 0:
            waves.append(Wave(count=int(term)))
        else:
            raise ConfigError(f"--waves size {term!r} must be a device count (e.g. 1) or a share (e.g. 10%)")
    if waves[-1].percent != 100:
        waves.append(Wave(percent=100.0))  # the last wave always takes the rest of the group
    return waves


@dataclass(frozen=True)
class AbortRule:
    type: str
    percent: float
    min_executed: int

    @classmethod
    def parse(cls, text: str) -> AbortRule:
        parts = text.split(":")
        if len(parts) != 3 or parts[0] not in FAILURE_TYPES or not parts[2].strip().isdigit():
            raise ConfigError(
                f"--abort-on {text!r} must be TYPE:PCT:MIN_EXECUTED with TYPE one of {', '.join(FAILURE_TYPES)} "
                "(e.g. failed:20%:5)"
            )
        return cls(parts[0], parse_percent(parts[1], "--abort-on threshold"), int(parts[2]))

    def states(self) -> tuple[str, ...]:
        return ("failed", "rejected", "timed_out") if self.type == "all" else (self.type,)

    def __str__(self) -> str:
        return f"{self.type}:{self.percent:g}%:{self.min_executed}"


@dataclass
class RolloutPlan:
    waves: list[Wave] = field(default_factory=lambda: [Wave(percent=100.0)])
    rate_per_min: float | None = None
    exponential: tuple[float, float] | None = None
    success_gate: float = 100.0
    abort_rules: list[AbortRule] = field(default_factory=list)
    device_timeout_s: float = 600.0
    retries: int = 0
    soak_s: float = 0.0
    rollback_on_abort: bool = False
    offline_wait_s: float = 600.0
    chunk_size: int = 256 * 1024
    ttl_s: float = 7 * 86400.0

    def __post_init__(self) -> None:
        if self.rate_per_min is not None and self.rate_per_min <= 0:
            raise ConfigError("--rate must be above 0 per minute")
        if self.exponential is not None and (self.exponential[0] <= 0 or self.exponential[1] < 1):
            raise ConfigError("--exponential BASE,FACTOR needs BASE > 0 and FACTOR >= 1")
        if self.retries < 0 or self.device_timeout_s <= 0:
            raise ConfigError("--retries must be 0 or more and --timeout above 0")

    @property
    def rate_based(self) -> bool:
        return self.rate_per_min is not None or self.exponential is not None

    def describe(self) -> str:
        if self.exponential:
            how = f"exponential rate from {self.exponential[0]:g}/min ×{self.exponential[1]:g}"
        elif self.rate_per_min:
            how = f"rate {self.rate_per_min:g}/min"
        else:
            how = "waves " + ",".join(map(str, self.waves))
        rules = ", ".join(map(str, self.abort_rules)) or "none"
        return f"{how}; gate {self.success_gate:g}%; abort on {rules}; soak {self.soak_s:g} s"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["waves"] = [asdict(w) for w in self.waves]
        data["abort_rules"] = [asdict(r) for r in self.abort_rules]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutPlan:
        data = dict(data)
        data["waves"] = [Wave(**w) for w in data["waves"]]
        data["abort_rules"] = [AbortRule(**r) for r in data["abort_rules"]]
        if data.get("exponential"):
            data["exponential"] = tuple(data["exponential"])
        return cls(**data)


def parse_rate(text: str) -> float:
    """``50/min``, ``2/s``, ``100/h`` -> devices per minute."""
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|min|m|h)\s*$", text)
    if not match:
        raise ConfigError(f"--rate {text!r} must be N/min (or N/s, N/h)")
    per = {"s": 1 / 60, "sec": 1 / 60, "min": 1.0, "m": 1.0, "h": 60.0}[match.group(2)]
    return float(match.group(1)) / per


def parse_exponential(text: str) -> tuple[float, float]:
    try:
        base, factor = (float(p) for p in text.split(","))
    except ValueError:
        raise ConfigError(f"--exponential {text!r} must be BASE,FACTOR (e.g. 10,2)") from None
    return base, factor
