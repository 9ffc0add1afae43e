"""The device's health as its retained state reports it: API readiness and alarms.

The operator's rollout ``--soak`` (``fleet/engine.py``) and ``edgepack fleet devices`` judge a device by
the ``health`` of its retained state, so that field must say what the device itself can see:

- ``ready``: what ``GET /v2/health/ready`` answers — every model the device should serve has a model
  loaded and self-tested in its slot (``LiveModels.unready_models``, with the reasons in ``unready``);
- ``alarms``, stable strings (a state is published again only when they change):

  - ``selftest: NAME …``: the store's active bundle of NAME is not what serves (its load or self-test
    failed at boot, so the device fell back to the previous bundle, or serves nothing);
  - ``inference_errors: NAME …``: the local API answered inference requests for NAME with server errors
    (``edgepack_inference_failures``) at least ``alarm_errors`` times in the last ``window_s`` seconds.

``ok`` is ``ready`` and no alarm. :class:`HealthWatch` re-checks every watched device's health on one
thread per process (the fleet simulator runs hundreds of devices per process) and calls back when it
changed, so a device that turns unhealthy while idle tells the broker within ``interval_s`` — and, with
the link's ``state_interval_s``, at least that often anyway (a heartbeat, for brokers that give wildcard
subscribers no retained messages).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from edgepack.protocol import DeviceHealth

log = logging.getLogger(__name__)

WINDOW_S = 60.0  # inference errors are counted over this many seconds
ALARM_ERRORS = 1  # this many server errors for one model in the window raise its alarm
INTERVAL_S = 2.0  # how often a watched device's health is checked again


class HealthMonitor:
    """Computes one agent's :class:`~edgepack.protocol.DeviceHealth` (``agent``: a DeviceAgent)."""

    def __init__(self, agent: Any, *, window_s: float = WINDOW_S, alarm_errors: int = ALARM_ERRORS) -> None:
        self.agent = agent
        self.window_s = window_s
        self.alarm_errors = alarm_errors
        self._samples: deque[tuple[float, dict[str, float]]] = deque()
        self._lock = threading.Lock()

    def check(self) -> DeviceHealth:
        live = self.agent.live
        unready = live.unready_models()
        alarms = self._selftest_alarms() + self._inference_alarms()
        return DeviceHealth(ok=not unready and not alarms, ready=not unready, unready=unready, alarms=alarms)

    def _selftest_alarms(self) -> list[str]:
        live, store = self.agent.live, self.agent.store
        alarms = []
        for name, entry in sorted(store.load_state().models.items()):
            if entry.active is None:
                continue
            current = live.current(name)
            if current is not None and current.digest == entry.active:
                continue
            why = next((e.get("reason") for e in live.index() if e.get("name") == name and e.get("reason")), None)
            serving = f"serves {current.version}" if current is not None else "serves nothing"
            alarms.append(f"selftest: {name}: its active bundle does not load or pass its self-test; "
                          f"{serving}" + (f" ({why})" if why else ""))  # fmt: skip
        return alarms

    def _inference_alarms(self) -> list[str]:
        totals = _failures_by_model(self.agent.metrics.failures)
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, totals))
            while len(self._samples) > 1 and now - self._samples[1][0] >= self.window_s:
                self._samples.popleft()
            oldest = self._samples[0][1]
        alarms = []
        for name, total in sorted(totals.items()):
            if total - oldest.get(name, 0.0) >= self.alarm_errors:
                alarms.append(f"inference_errors: {name}: server errors in the last {self.window_s:g} s")
        return alarms


def _failures_by_model(counter: Any) -> dict[str, float]:
    """The ``edgepack_inference_failures`` counter summed per model label."""
    out: dict[str, float] = {}
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                model = sample.labels.get("model", "")
                out[model] = out.get(model, 0.0) + sample.value
    return out


class HealthWatch:
    """One thread per process that checks every watched device's health each ``interval_s`` and calls
    its callback when the health differs from what it last reported."""

    _instance: HealthWatch | None = None
    _instance_lock = threading.Lock()

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._watched: dict[int, tuple[Callable[[], DeviceHealth], Callable[[DeviceHealth], None]]] = {}
        self._last: dict[int, DeviceHealth] = {}
        self._every: dict[int, float] = {}  # key -> heartbeat period (s): call back although nothing changed
        self._told: dict[int, float] = {}  # key -> when it last reported
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def shared(cls) -> HealthWatch:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def watch(self, key: int, check: Callable[[], DeviceHealth], changed: Callable[[DeviceHealth], None],
              initial: DeviceHealth | None = None, every_s: float = 0.0) -> None:  # fmt: skip
        """Call ``changed`` when ``check`` differs from the last report, and (``every_s`` > 0) at least
        that often in any case (a heartbeat)."""
        with self._lock:
            self._watched[key] = (check, changed)
            self._told[key] = time.monotonic()
            if every_s > 0:
                self._every[key] = every_s
            if initial is not None:
                self._last[key] = initial
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="edgepack-health", daemon=True)
                self._thread.start()

    def reported(self, key: int, health: DeviceHealth) -> None:
        """The device published ``health`` by itself (a job's state): no callback for it."""
        with self._lock:
            if key in self._watched:
                self._last[key] = health
                self._told[key] = time.monotonic()

    def unwatch(self, key: int) -> None:
        with self._lock:
            self._watched.pop(key, None)
            self._last.pop(key, None)
            self._every.pop(key, None)
            self._told.pop(key, None)

    def _loop(self) -> None:
        while True:
            time.sleep(min([self.interval_s, *self._every.values()]))
            with self._lock:
                watched = list(self._watched.items())
            for key, (check, changed) in watched:
                try:
                    health = check()
                except Exception:  # one device's store must not stop the watch of the others
                    log.exception("cannot check the device's health")
                    continue
                with self._lock:
                    now = time.monotonic()
                    due = key in self._every and now - self._told.get(key, now) >= self._every[key]
                    if key not in self._watched or (self._last.get(key) == health and not due):
                        continue
                    self._last[key], self._told[key] = health, now
                try:
                    changed(health)
                except Exception:
                    log.exception("cannot publish the device's new health")
