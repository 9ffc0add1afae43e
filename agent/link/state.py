"""The device's retained state: what it runs, what it is fetching, what it had to repair; and its last will.

Published on every (re)connect and after every job (before the job's ``result``, so whoever reads the
result finds the new state); the last will is the same state with ``online: false``, refreshed each time.
Building the state never raises: a store that cannot be read becomes a notice, not a dead connect callback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from edgepack import __version__
from edgepack.agent.field_data import capture_status, drift_status
from edgepack.agent.health import HealthMonitor, HealthWatch
from edgepack.agent.service import DeviceAgent, describe_store
from edgepack.manifest import utc_now
from edgepack.mqtt import MqttClient, Will
from edgepack.protocol import DeviceHealth, DeviceState, ModelStatus, TransferStatus, TrustStatus, encode

log = logging.getLogger(__name__)

JSON = "application/json"


class StatePublisher:
    """The ``state`` topic of one device."""

    def __init__(
        self,
        agent: DeviceAgent,
        client: MqttClient,
        topic: str,
        *,
        device: str,
        groups: list[str],
        will_delay_s: int,
        transfer: Callable[[], TransferStatus | None],
        dropped_events: Callable[[], int],
        notices: Callable[[], list[str]],
    ) -> None:
        self.agent = agent
        self.client = client
        self.topic = topic
        self.device = device
        self.groups = groups
        self.will_delay_s = will_delay_s
        self._transfer = transfer
        self._dropped = dropped_events
        self._notices = notices
        self.health = HealthMonitor(agent)  # the state's ``health`` (agent/health.py)
        self._last_health: DeviceHealth | None = None

    def start_watch(self, every_s: float = 0.0) -> None:
        """Publish the state again whenever the device's health changes (checked every few seconds), and with
        ``every_s`` > 0 at least that often (a heartbeat)."""
        HealthWatch.shared().watch(id(self), self._check_health, lambda _: self.publish(), self._last_health,
                                   every_s=every_s)  # fmt: skip

    def stop_watch(self) -> None:
        HealthWatch.shared().unwatch(id(self))

    def _check_health(self) -> DeviceHealth:
        self._last_health = self.health.check()
        return self._last_health

    def will(self) -> Will:
        return Will(self.topic, encode(self.state(online=False)), 1, True, self.will_delay_s)

    def publish(self) -> None:
        if not self.client.is_connected:
            return
        self.client.publish(self.topic, encode(self.state(online=True)), retain=True, content_type=JSON)
        self.client.set_will(self.will())
        if self._last_health is not None:
            HealthWatch.shared().reported(id(self), self._last_health)

    def publish_offline(self, timeout: float = 2.0) -> None:
        if self.client.is_connected:
            info = self.client.publish(self.topic, encode(self.state(online=False)), retain=True, content_type=JSON)
            info.wait_for_publish(timeout)

    def state(self, *, online: bool) -> DeviceState:
        notices = list(self._notices())
        models: dict[str, ModelStatus] = {}
        try:
            status = describe_store(self.agent.store, self.agent.live)
            notices += [str(n) for n in status.get("notices", [])]
            for name, row in status["models"].items():
                models[name] = ModelStatus(
                    active=row["active"]["version"] if row["active"] else None,
                    previous=row["previous"]["version"] if row["previous"] else None,
                    serving=row.get("serving"),
                    highest_version=row["highest_version"],
                    bundle=row["active"]["bundle"] if row["active"] else None,
                    drift=drift_status(self.agent, name),
                )
        except Exception as exc:  # the state must go out whatever the store says; say what failed
            log.exception("cannot describe the store for the device state")
            notices.append(f"cannot read the store: {exc}")
        try:
            health: DeviceHealth | None = self._check_health()
        except Exception as exc:
            log.exception("cannot check the device's health for the device state")
            health = None
            notices.append(f"cannot check health: {exc}")
        config = self.agent.config
        try:
            trust: TrustStatus | None = TrustStatus(**self.agent.trust.describe())
        except Exception as exc:
            log.exception("cannot describe the trust root for the device state")
            trust = None
            notices.append(f"cannot describe the trust root: {exc}")
        if trust is not None and trust.expired:
            notices.append(
                f"trust root version {trust.version} expired at {trust.expires}: serving the installed models, "
                "accepting nothing new until a fresh root arrives"
            )
        return DeviceState(
            device=self.device,
            online=online,
            at=utc_now(),
            labels=config.labels,
            groups=self.groups,
            targets=config.targets,
            models=models,
            transfer=self._transfer(),
            protocol=self.client.protocol,
            agent_version=__version__,
            dropped_events=self._dropped(),
            notices=notices,
            health=health,
            trust=trust,
            capture=capture_status(self.agent),
        )
