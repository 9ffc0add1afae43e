"""``edgepack agent run``: the device daemon — the local API from the store at once, the MQTT link beside it.

Start-up order is what makes a device useful without a network: settle interrupted installs and load the
last committed bundles (``DeviceAgent.boot``), start the local API, then the MQTT link *in the background*
(it connects, reconnects with backoff, resumes pending commands and transfers on its own), and wait for
SIGINT/SIGTERM. A broker that is down, unreachable or not configured changes nothing
about serving.

Configuration comes from ``--config agent.toml`` (see ``agent/config.py``); the settings marked there as
flags can also be given on the command line (:class:`DaemonFlags` maps them back through the same table);
flags win. The link's tuning is the config's ``[link]`` section unless the caller passes its own
:class:`~edgepack.agent.link.LinkOptions` (tests shorten the waits that way). A link that cannot start is
logged and the device serves on without it (:func:`start_link`).

Usage::

    config = daemon_config(Path("agent.toml"), DaemonFlags(device_id="cam-7", broker="mqtt://10.0.0.2"))
    run(config)                          # link tuning from config.link
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

from edgepack.agent.config import MACHINE_ID, AgentConfig, flag_specs, load_config, resolve_device_id
from edgepack.agent.control import ControlServer
from edgepack.agent.factory import install_factory_bundles
from edgepack.agent.link import AgentLink, LinkOptions
from edgepack.agent.sdnotify import Watchdog, notify_serving
from edgepack.agent.service import DeviceAgent
from edgepack.errors import ConfigError, EdgepackError

log = logging.getLogger(__name__)


class DaemonFlags:
    """Command-line values by flag ``dest`` (:func:`edgepack.agent.config.flag_specs`); None or an empty list
    leaves the config file's (or the default) value. Nothing is listed here: the table is the config's fields.

    ``DaemonFlags(device_id="cam-7", broker="mqtt://10.0.0.2", max_rate="500k", labels=["line=2"])``
    """

    def __init__(self, **values: Any) -> None:
        specs = {spec.dest: spec for spec in flag_specs()}
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise TypeError(f"unknown daemon flag(s) {', '.join(unknown)}; known: {', '.join(sorted(specs))}")
        self._specs = specs
        self.values = values

    @property
    def labels(self) -> list[str]:
        return list(self.values.get("labels") or [])

    def overrides(self) -> dict[str, Any]:
        """Dotted config keys → values, for :func:`~edgepack.agent.config.load_config` (labels: see daemon_config)."""
        out: dict[str, Any] = {}
        for dest, value in self.values.items():
            spec = self._specs[dest]
            if dest == "labels" or value is None or (spec.multiple and not value):
                continue
            plain = str(value) if isinstance(value, Path) else value
            out[spec.key] = [str(v) for v in value] if spec.multiple else plain
        return out


def parse_labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"label {pair!r} must look like KEY=VALUE (e.g. --label site=plant-3)")
        labels[key.strip()] = value.strip()
    return labels


def daemon_config(path: Path | None, flags: DaemonFlags, *, machine_id: Path = MACHINE_ID) -> AgentConfig:
    """The config file with the flags applied on top (labels from both merged), with a device id: the one
    configured, else one derived from ``/etc/machine-id`` (logged; see ``resolve_device_id``)."""
    overrides = flags.overrides()
    if flags.labels:
        base = load_config(path).labels
        overrides["labels"] = {**base, **parse_labels(flags.labels)}
    config, _source = resolve_device_id(load_config(path, overrides), machine_id)
    return config


def link_options(config: AgentConfig) -> LinkOptions:
    """The link's tuning as the config (file and flags) sets it: the ``[link]`` section itself."""
    return config.link


def start_link(agent: DeviceAgent, options: LinkOptions | None = None) -> AgentLink | None:
    """Start the MQTT link beside the API; None (logged, never raised) when it cannot start: serving must
    never depend on the link (a corrupt command book, no device id, a bad broker URL, a bug)."""
    config = agent.config
    link: AgentLink | None = None
    try:
        link = AgentLink(agent, options or link_options(config))
        link.start()
    except Exception as exc:
        log.error(
            "device %s: the MQTT link did not start (%s); serving from the store only",
            config.device_id or "(no id)",
            exc,
            exc_info=not isinstance(exc, EdgepackError),
        )
        if link is not None:
            try:
                link.stop(timeout=1.0)
            except Exception:
                log.exception("stopping the half-started link failed")
        return None
    for notice in link.notices:
        log.warning("device %s: %s", config.device_id, notice)
    log.info("device %s: MQTT link to %s (prefix %s)", config.device_id, config.broker.url, config.broker.prefix)
    return link


def run(config: AgentConfig, options: LinkOptions | None = None, *, stop: threading.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or ``stop`` is set); the MQTT link runs beside the API when configured.

    The API runs in a thread and this thread waits for the signal, so that on the way out the link can
    mark the device offline (a clean DISCONNECT publishes no will) before the API stops.
    """
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
    if config.broker.url and not config.device_id:
        config, _source = resolve_device_id(config)
    agent = DeviceAgent(config)
    agent.boot()
    install_factory_bundles(agent)  # an empty store and a firmware image's factory bundle: install it first
    handle = agent.start_api()
    log.info("device %s: local inference API on http://%s", config.device_id, handle.url)
    if handle.grpc is not None:
        log.info("device %s: KServe v2 gRPC on %s", config.device_id, handle.grpc.url)
    link: AgentLink | None = None
    watchdog: Watchdog | None = None
    control: ControlServer | None = None
    try:
        if config.broker.url:
            link = start_link(agent, options)
        else:
            log.warning("device %s: no broker configured; serving from the store only", config.device_id)
        # `edgepack agent install|rollback|status --state` run in this process, through its socket
        control = ControlServer(agent, status_extra=lambda: {"link": link.status() if link else None}).start()
        watchdog = notify_serving(handle, link, f"serving on http://{handle.url}")  # READY=1, then WATCHDOG=1
        while not stop.wait(1.0):
            pass
        log.info("stopping")
    finally:
        if watchdog is not None:
            watchdog.notifier.stopping()  # STOPPING=1
            watchdog.stop()
        if control is not None:
            control.stop()
        if link is not None:
            link.stop()
        agent.close()
