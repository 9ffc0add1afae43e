"""The device agent as one object: store, live models, installer, metrics and the local API, wired.

It serves from its store from the first second (``boot``), with no network: the MQTT link (when
configured) only brings new bundles and commands. ``edgepack serve``, ``edgepack agent install`` and
``edgepack agent run`` all build one of these.

Usage::

    agent = DeviceAgent(config)
    agent.boot()                                  # recover interrupted installs, load committed models
    handle = agent.start_api()                    # local KServe v2 API in a background thread
    agent.install(Path("digits.epk"))             # hot swap, rolled back on self-test failure
    agent.close()
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgepack.agent.api.app import default_workers
from edgepack.agent.api.metrics import ApiMetrics
from edgepack.agent.api.server import ServerHandle, serve, start_in_thread
from edgepack.agent.config import AgentConfig
from edgepack.agent.field_data import FieldData
from edgepack.agent.field_metrics import FieldDataCollector
from edgepack.agent.install import Installer, InstallResult
from edgepack.agent.live import ActiveModels, LiveModels, SwapListener
from edgepack.agent.store import DeviceStore
from edgepack.agent.store_lock import StoreLock
from edgepack.agent.threads import ServingPlan
from edgepack.errors import EdgepackError
from edgepack.trust import TrustStore

log = logging.getLogger(__name__)


class MetricsListener(SwapListener):
    """Keeps the Prometheus gauges and counters in step with swaps and rollbacks."""

    def __init__(self, metrics: ApiMetrics) -> None:
        self.metrics = metrics

    def swapped(self, name: str, old: str | None, new: str | None) -> None:
        if old is not None and new is not None:
            self.metrics.swaps.inc()
        if new is None:
            self.metrics.clear_active(name)
        else:
            self.metrics.set_active(name, new)

    def rolled_back(self, name: str, reason: str) -> None:
        self.metrics.rollbacks.inc()


class DeviceAgent:
    """Everything that runs on the device except the MQTT link."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.trust = TrustStore.load(config.trust_dir)
        self.lock = StoreLock.acquire(config.state_dir)  # one process per state directory, for our whole life
        try:
            self.store = DeviceStore(config.state_dir)
        except BaseException:
            self.lock.release()
            raise
        self.metrics = ApiMetrics()
        # readiness waits for every model with an active bundle in state.json (agent/live.py)
        self.live = LiveModels(listener=MetricsListener(self.metrics), expected=ActiveModels(self.store))
        # the thread budget, per-model limits and dynamic batching every loaded model gets (agent/threads.py)
        self.serving = ServingPlan.from_config(config)
        self.installer = Installer(
            self.store,
            self.live,
            self.trust,
            device_targets=set(config.targets) if config.targets else None,
            options=config.runtime_options,
            serving=self.serving,
        )
        # drift against the bundles' reference statistics, and opt-in data capture (agent/field_data.py)
        self.field_data = FieldData(config.drift, config.capture, config.state_dir, bundle_dir=self.store.bundle_dir)
        self.live.observer_factory = self.field_data.observer_for
        self.metrics.add_collector(FieldDataCollector(self.field_data))
        self._api: ServerHandle | None = None

    def boot(self) -> dict[str, str]:
        """Settle interrupted installs and load every committed model; returns name → version loaded."""
        for note in self.installer.recover():
            log.warning("recovery: %s", note)
        for name in self.store.remove_interrupted_writes():
            log.info("removed %s, the temporary file of a write a crash interrupted", name)
        loaded = self.installer.load_committed()
        log.info("serving %s", ", ".join(f"{n} {v}" for n, v in loaded.items()) or "no model yet")
        return loaded

    def install(self, bundle: Path) -> InstallResult:
        return self.installer.install(bundle)

    def rollback(self, name: str) -> InstallResult:
        return self.installer.rollback(name)

    def status(self) -> dict[str, Any]:
        status = {**describe_store(self.store, self.live), "trust": self.trust.describe()}
        status["field_data"] = self.field_data.status()  # drift per model, the capture buffer (docs/capture.md)
        return status

    # --- local API -------------------------------------------------------------------------------

    def _api_args(self) -> dict[str, Any]:
        return {
            "token": self.config.token,
            "max_body_bytes": int(self.config.max_body_mb * (1 << 20)),
            "metrics": self.metrics,
            "insecure_listen": self.config.insecure_listen,
            "unix_path": self.config.listen_unix,
            "unix_mode": self.config.listen_unix_mode,
            "max_concurrent_requests": self.config.max_concurrent_requests,
            "max_queued_bytes": int(self.config.max_queued_mb * (1 << 20)) if self.config.max_queued_mb else None,
            "grpc_port": self.config.grpc_port,
            # a batch of N forms only while N requests wait in the API's inference threads
            "workers": max(default_workers(), self.serving.batch_threads) if self.serving.batch_threads > 1 else None,
        }

    def start_api(self, port: int | None = None) -> ServerHandle:
        self._api = start_in_thread(
            self.live, self.config.host, self.config.port if port is None else port, **self._api_args()
        )
        return self._api

    @property
    def api_url(self) -> str:
        """``host:port`` of the API started by :meth:`start_api` (as tritonclient takes it)."""
        if self._api is None:
            raise RuntimeError("the local API is not started")
        return self._api.url

    def serve_forever(self) -> None:
        serve(self.live, self.config.host, self.config.port, **self._api_args())

    def close(self) -> None:
        if self._api is not None:
            self._api.stop()
            self._api = None
        self.live.close_all()
        self.field_data.close()
        self.lock.release()


def describe_store(store: DeviceStore, live: LiveModels | None = None) -> dict[str, Any]:
    """What ``edgepack agent status`` shows: per model, the committed bundles and what is loaded."""
    state = store.load_state()
    models = {}
    for name, entry in sorted(state.models.items()):
        row: dict[str, Any] = {"highest_version": entry.highest_version}
        for role in ("active", "previous"):
            digest = getattr(entry, role)
            row[role] = {"version": _stored_version(store, digest), "bundle": digest} if digest else None
        if live is not None:
            current = live.current(name)
            row["serving"] = current.version if current else None
        models[name] = row
    journal = [j.data for j in store.journals()[-10:]]
    # notices: what the store repaired on its own (a corrupt state.json or journal quarantined and rebuilt)
    return {
        "state_dir": str(store.root),
        "models": models,
        "recent_installs": journal,
        "notices": list(store.notices),
    }


def _stored_version(store: DeviceStore, digest: str) -> str | None:
    """The version of a stored bundle; None when its manifest is missing or unreadable (status never fails)."""
    try:
        return store.manifest(digest).version
    except (OSError, EdgepackError) as exc:
        log.warning("cannot read the manifest of stored bundle %s…: %s", digest[:12], exc)
        return None
