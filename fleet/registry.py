"""The device registry: every device the broker holds a retained state for, as the operator sees it.

``edgepack fleet devices [--group SELECTOR]`` reads the retained ``devices/+/state`` topics once (the
sync marker of :class:`~edgepack.fleet.deploy.Deployer` says when they have all arrived) and lists per
device: online or not, last seen (the state's ``at``), labels and groups, per model the active and
previous version, and what newer agents add to their state (``health``, ``runtime``: the schema ignores
unknown fields, the registry keeps them). ``edgepack fleet forget DEVICE…`` clears a retired device's
retained state and command, so nobody waits for it again (``deploy --wait`` to a group skips members
without a state, and members offline past a grace).

There is no registry database: the broker's retained states are the registry, and each device writes
only its own (its last will marks it offline).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from edgepack.errors import ConfigError
from edgepack.fleet.deploy import Deployer
from edgepack.fleet.selectors import Selector
from edgepack.mqtt import MqttOptions
from edgepack.protocol import NAME_RE, DeviceState, Topics

log = logging.getLogger(__name__)


@dataclass
class DeviceRecord:
    """One device as its retained state describes it."""

    device: str
    online: bool
    last_seen: datetime
    labels: dict[str, str]
    groups: list[str]
    models: dict[str, dict[str, Any]]
    targets: list[str] | None = None
    agent_version: str | None = None
    protocol: str | None = None
    health: Any = None
    runtime: Any = None
    transfer: dict[str, Any] | None = None
    notices: list[str] = field(default_factory=list)
    capture: dict[str, Any] | None = None  # the capture ring buffer (docs/capture.md); None: capture off
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_state(cls, state: DeviceState, extras: dict[str, Any] | None = None) -> DeviceRecord:
        extras = dict(extras or {})
        return cls(
            device=state.device,
            online=state.online,
            last_seen=state.at,
            labels=dict(state.labels),
            groups=list(state.groups),
            models={name: m.model_dump() for name, m in state.models.items()},
            targets=state.targets,
            agent_version=state.agent_version,
            protocol=state.protocol,
            health=state_health(state, extras.pop("health", None)),
            runtime=extras.pop("runtime", None),
            transfer=state.transfer.model_dump() if state.transfer else None,
            notices=list(getattr(state, "notices", []) or []),
            capture=state.capture.model_dump() if state.capture else None,
            extras=extras,
        )

    def healthy(self) -> bool:
        """False when the state reports a health problem (an alarm, ``ok: false``, ``ready: false``)."""
        return health_problem(self.health) is None

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k != "extras"}
        data["last_seen"] = self.last_seen.strftime("%Y-%m-%dT%H:%M:%SZ")
        data.update(self.extras)
        return data


def health_problem(health: Any) -> str | None:
    """What is wrong according to a state's ``health`` field (None: nothing, or not reported).

    Agents report a mapping (``edgepack.protocol.DeviceHealth``, computed by ``agent/health.py``): a
    non-empty ``alarms`` list (self-test, inference errors) or ``ready``/``ok`` false is a problem.
    """
    if not isinstance(health, dict):
        return None
    alarms = health.get("alarms")
    if alarms:
        return "alarm: " + "; ".join(map(str, alarms)) if isinstance(alarms, list) else f"alarms: {alarms}"
    for key in ("ready", "api_ready", "ok"):
        if health.get(key) is False:
            unready = health.get("unready")
            if key != "ok" and isinstance(unready, dict) and unready:
                return "not ready: " + "; ".join(f"{name} {why}" for name, why in sorted(unready.items()))
            return f"health says {key} = false"
    return None


def state_health(state: DeviceState | None, extra: Any = None) -> Any:
    """A state's ``health`` as a mapping (``DeviceState.health``, or the field of a newer agent the schema
    does not know, ``extra``); None when the device reports none."""
    if state is not None and state.health is not None:
        return state.health.model_dump()
    return extra


def drift_summary(models: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(level, text) per model reporting drift: ``digits alarm (input[2] psi 0.41)``; ``fleet devices`` shows it."""
    out = []
    for name, model in sorted(models.items()):
        drift = model.get("drift")
        if not isinstance(drift, dict) or "level" not in drift:
            continue
        level = str(drift["level"])
        worst = [w for w in drift.get("worst") or [] if isinstance(w, dict) and w.get("level") in ("warn", "alarm")]
        detail = ", ".join(f"{w.get('tensor')}[{w.get('channel')}] psi {float(w.get('psi', 0)):.2f}" for w in worst[:2])
        out.append((level, f"{name} {level}" + (f" ({detail})" if detail else "")))
    return out


def capture_summary(capture: dict[str, Any] | None) -> str | None:
    """``capture: 12 waiting, 3 dropped`` for ``fleet devices``; None when the device captures nothing."""
    if not capture:
        return None
    dropped = capture.get("dropped") or 0
    return f"capture: {capture.get('records', 0)} waiting" + (f", {dropped} dropped" if dropped else "")


def records(deployer: Deployer, selector: Selector | None = None) -> list[DeviceRecord]:
    """The devices a connected, synced deployer knows, filtered by ``selector``, sorted by id."""
    with deployer._lock:
        states = dict(deployer.states)
        extras = dict(deployer.state_extras)
    out = [DeviceRecord.from_state(s, extras.get(d)) for d, s in states.items()]
    if selector is not None:
        out = [r for r in out if selector.matches(r.device, r.labels, r.groups)]
    return sorted(out, key=lambda r: r.device)


def list_devices(
    options: MqttOptions, *, prefix: str = "edgepack", selector: Selector | None = None, connect_timeout: float = 10.0,
    nodes: list[MqttOptions] | None = None, listen_s: float = 0.0,
) -> list[DeviceRecord]:  # fmt: skip
    """Read every retained device state once (from every node given) and return the devices ``selector`` picks.

    ``listen_s``: then listen that long for states published live (devices' heartbeats, on a broker that
    gives wildcard subscriptions no retained messages: RabbitMQ 3.x, ``docs/scaling.md``)."""
    with Deployer(options, Topics(prefix), connect_timeout=connect_timeout, nodes=nodes or ()) as deployer:
        deployer.sync()
        if listen_s > 0:
            time.sleep(listen_s)
        return records(deployer, selector)


def forget_devices(
    devices: list[str], options: MqttOptions, *, prefix: str = "edgepack", connect_timeout: float = 10.0,
    nodes: list[MqttOptions] | None = None,
) -> dict[str, bool]:  # fmt: skip
    """Clear the retained state and command of each device; returns device -> whether it had a state.

    A device that is still running publishes its state again at its next reconnect: forget retired ones.
    """
    bad = [d for d in devices if not NAME_RE.match(d)]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: not device ids (letters, digits, '._=:-', at most 128)")
    topics = Topics(prefix)
    with Deployer(options, topics, connect_timeout=connect_timeout, nodes=nodes or ()) as deployer:
        deployer.sync()
        known = {d: d in deployer.states for d in devices}
        online = [d for d in devices if d in deployer.states and deployer.states[d].online]
        for device in online:
            log.warning("device %s is online: it publishes its state again when it reconnects", device)
        infos = []
        for device in devices:
            infos += deployer.publish_retained(topics.state(device), b"")
            infos += deployer.publish_retained(topics.device_command(device), b"")
        deployer.wait_all(infos, 30)
    return known
