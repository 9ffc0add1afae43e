"""``edgepack agent run``: the device daemon — the local API from the store at once, the MQTT link beside it.

Start-up order is what makes a device useful without a network: settle interrupted installs and load the
last committed bundles (``DeviceAgent.boot``), start the local API, then the MQTT link *in the background*
(it connects, reconnects with backoff, resumes pending commands and transfers on its own), and wait for
SIGINT/SIGTERM. A broker that is down, unreachable or not configured changes nothing
about serving.

Configuration comes from ``--config agent.toml`` (see ``agent/config.py``), and every setting can also be
given as a flag (:class:`DaemonFlags`); flags win. The link's tuning comes from the config's ``[link]``
section (``--max-rate``, ``--stall``, ``--session-expiry`` override it) unless the caller passes its own
:class:`~edgepack.agent.link.LinkOptions` (tests shorten the waits that way).

Usage::

    config = daemon_config(Path("agent.toml"), DaemonFlags(device_id="cam-7", broker="mqtt://10.0.0.2"))
    run(config)                          # link tuning from config.link
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.agent.config import AgentConfig, load_config
from edgepack.agent.link import AgentLink, LinkOptions
from edgepack.agent.service import DeviceAgent
from edgepack.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DaemonFlags:
    """Command-line settings; None leaves the config file's (or the default) value."""

    device_id: str | None = None
    labels: list[str] = field(default_factory=list)  # KEY=VALUE, added to the file's labels
    targets: list[str] = field(default_factory=list)
    state: Path | None = None
    trust: Path | None = None
    listen: str | None = None
    token: str | None = None
    threads: int | None = None
    accelerators: bool | None = None
    runtime_cache: Path | None = None
    max_body_mb: float | None = None
    disk_quota_mb: float | None = None
    broker: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None
    prefix: str | None = None
    protocol: str | None = None
    keepalive: int | None = None
    max_buffered_events: int | None = None
    max_rate: str | None = None
    stall_s: float | None = None
    session_expiry_s: int | None = None

    def overrides(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "targets": self.targets or None,
            "state_dir": str(self.state) if self.state else None,
            "trust_dir": str(self.trust) if self.trust else None,
            "listen": self.listen,
            "token": self.token,
            "runtime.threads": self.threads,
            "runtime.allow_accelerators": self.accelerators,
            "runtime.cache_dir": str(self.runtime_cache) if self.runtime_cache else None,
            "max_body_mb": self.max_body_mb,
            "disk_quota_mb": self.disk_quota_mb,
            "broker.url": self.broker,
            "broker.ca": str(self.ca) if self.ca else None,
            "broker.cert": str(self.cert) if self.cert else None,
            "broker.key": str(self.key) if self.key else None,
            "broker.username": self.username,
            "broker.password": self.password,
            "broker.prefix": self.prefix,
            "broker.protocol": self.protocol,
            "broker.keepalive": self.keepalive,
            "broker.max_buffered_events": self.max_buffered_events,
            "link.max_rate": self.max_rate,
            "link.stall_s": self.stall_s,
            "link.session_expiry_s": self.session_expiry_s,
        }


def parse_labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"label {pair!r} must look like KEY=VALUE (e.g. --label site=plant-3)")
        labels[key.strip()] = value.strip()
    return labels


def daemon_config(path: Path | None, flags: DaemonFlags) -> AgentConfig:
    """The config file with the flags applied on top; labels from both are merged."""
    overrides = flags.overrides()
    if flags.labels:
        base = load_config(path).labels
        overrides["labels"] = {**base, **parse_labels(flags.labels)}
    return load_config(path, overrides)


def link_options(config: AgentConfig) -> LinkOptions:
    """The link's tuning as the config (file and flags) sets it."""
    return LinkOptions(**config.link.model_dump())


def run(config: AgentConfig, options: LinkOptions | None = None, *, stop: threading.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or ``stop`` is set); the MQTT link runs beside the API when configured.

    The API runs in a thread and this thread waits for the signal, so that on the way out the link can
    mark the device offline (a clean DISCONNECT publishes no will) before the API stops.
    """
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
    agent = DeviceAgent(config)
    agent.boot()
    handle = agent.start_api()
    log.info("device %s: local inference API on http://%s", config.device_id, handle.url)
    link: AgentLink | None = None
    try:
        if config.broker.url:
            link = AgentLink(agent, options or link_options(config))
            link.start()
            log.info(
                "device %s: MQTT link to %s (prefix %s)", config.device_id, config.broker.url, config.broker.prefix
            )
        else:
            log.warning("device %s: no broker configured; serving from the store only", config.device_id)
        while not stop.wait(1.0):
            pass
        log.info("stopping")
    finally:
        if link is not None:
            link.stop()
        agent.close()
