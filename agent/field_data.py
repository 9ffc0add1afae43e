"""Field data on the device: live statistics (drift) and data capture, fed from the inference path at a bounded cost.

One :class:`FieldData` per agent. When a model is swapped in, :meth:`FieldData.observer_for` gives it a
:class:`ModelObserver` (``agent/live.py`` calls it for every request the model answered). On the request
thread the observer only decides and hands over references — a counter (``[drift] every``), a time budget
(``budget_ms_per_s`` of one core, refilled continuously and spent by the statistics thread), a
``sample_rate`` draw for capture — and puts the request's arrays on a bounded queue (``queue`` requests,
``queue_mb`` of tensors); a full queue skips the request (counted), it never waits. One daemon thread
takes the queue: it bins the request into the model's :class:`~edgepack.agent.drift.DriftMonitor`, applies
the capture rules and writes records into the :class:`~edgepack.agent.capture.CaptureBuffer`.

Failure never reaches inference: an exception in an observer or in the thread is logged once, disables
field data for that model (``disabled`` in its status, a notice in the device state), and the model serves
on. The arrays are not copied: the API decodes a fresh array per request and nothing writes to it after.

Usage (``agent/service.py`` does this)::

    field = FieldData(config.drift, config.capture, config.state_dir, bundle_dir=store.bundle_dir)
    live.observer_factory = field.observer_for
    field.drift("digits")             # DriftReport or None
    field.status()                    # per model: drift, skipped, disabled; capture buffer counters
    field.configure("digits", {"inputs": ["input"], "random_share": 0.01}, seq)   # an operator's config

Capture settings of a model come from ``[capture.models.NAME]`` in ``agent.toml``, else from the operator's
signed :class:`~edgepack.protocol.CaptureConfig` (``edgepack deploy --capture``, ``fleet capture set``),
kept in ``capture/remote.json``; neither does anything unless ``[capture] enabled`` is true on the device.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.capture import CaptureBuffer, CaptureRules
from edgepack.agent.config import CaptureModelSettings, CaptureSettings, DriftSettings
from edgepack.agent.drift import DriftMonitor, DriftReport
from edgepack.capture_record import CaptureRecord, channel_summary
from edgepack.errors import EdgepackError
from edgepack.fsutil import atomic_write_json, read_json
from edgepack.manifest import Manifest
from edgepack.protocol import CaptureStatus, DriftStatus
from edgepack.refstats import METADATA_KEY, ReferenceStats, channel_axis

log = logging.getLogger(__name__)

REMOTE = "remote.json"  # the operator's capture configs, beside the ring buffer


class _Budget:
    """A token bucket of seconds of statistics work: refills at ``rate`` s/s up to one second's worth."""

    def __init__(self, ms_per_s: float) -> None:
        self.rate = ms_per_s / 1000.0
        self.tokens = self.rate
        self._at = time.monotonic()

    def allows(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self._at) * self.rate)
        self._at = now
        return self.tokens > 0

    def spend(self, seconds: float) -> None:
        self.tokens -= seconds


@dataclass
class _Job:
    observer: ModelObserver
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    stats: bool
    capture: bool
    nbytes: int
    at: float


@dataclass
class ModelObserver:
    """What field data does for one loaded model version (see the module docstring)."""

    owner: FieldData
    manifest: Manifest
    monitor: DriftMonitor | None
    rules: CaptureRules | None
    counter: Any = field(default_factory=lambda: itertools.count(1))
    disabled: str | None = None
    skipped: int = 0
    captured: int = 0
    last_level: str | None = None
    checked_at: float = -1e9

    @property
    def name(self) -> str:
        return self.manifest.name

    def __call__(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """On the request thread, after the model answered: decide and enqueue; never raises, never waits."""
        if self.disabled is not None:
            return
        try:
            n = next(self.counter)
            stats = self.monitor is not None and n % self.owner.drift_settings.every == 0 and self.owner.budget.allows()
            capture = self.rules is not None and self.rules.sampled()
            if stats or capture:
                self.owner._enqueue(self, inputs, outputs, stats, capture)
        except Exception as exc:  # the boundary: nothing of field data may fail a request
            self.disable(exc)

    def disable(self, exc: BaseException) -> None:
        self.disabled = f"{type(exc).__name__}: {exc}"
        log.error("field data of %s %s disabled: %s (the model serves on)", self.name, self.manifest.version,
                  self.disabled, exc_info=not isinstance(exc, EdgepackError))  # fmt: skip

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.manifest.version, "skipped": self.skipped, "captured": self.captured}
        if self.disabled:
            out["disabled"] = self.disabled
        if self.monitor is None:
            out["drift"] = None
        else:
            out["drift"] = self.monitor.report().to_json()
        return out


class FieldData:
    """Drift monitors and capture of every model an agent serves, and the thread that feeds them."""

    def __init__(
        self,
        drift: DriftSettings,
        capture: CaptureSettings,
        state_dir: Path,
        *,
        bundle_dir: Callable[[str], Path],
        on_level_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self.drift_settings = drift
        self.capture_settings = capture
        self.bundle_dir = bundle_dir
        self.on_level_change = on_level_change
        self.budget = _Budget(drift.budget_ms_per_s)
        self.buffer: CaptureBuffer | None = None
        self._remote: dict[str, tuple[int, CaptureModelSettings | None]] = {}  # model -> (seq, settings)
        if capture.enabled:  # with no model listed too: an operator's signed capture config may name one
            self.buffer = CaptureBuffer(
                capture.directory or Path(state_dir) / "capture", max_bytes=capture.max_bytes,
                max_count=capture.max_count,
            )  # fmt: skip
            self._remote = self._read_remote()
        self._observers: dict[str, ModelObserver] = {}
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=drift.queue)
        self._queued_bytes = 0
        self._max_bytes = int(drift.queue_mb * (1 << 20))
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.skipped_full = 0

    # --- wiring ----------------------------------------------------------------------------------

    def observer_for(self, model: Any) -> ModelObserver | None:
        """The observer of a model being swapped in (``model``: a LiveModel); None when nothing is watched."""
        manifest: Manifest = model.manifest
        monitor = None
        try:
            stats = self._reference(manifest, model.digest)
            if stats is not None and self.drift_settings.enabled:
                monitor = DriftMonitor(stats, self.drift_settings)
        except (EdgepackError, OSError) as exc:
            log.warning("%s %s: reference statistics unusable (%s); no drift signal", manifest.name,
                        manifest.version, exc)  # fmt: skip
        settings = self.capture_for(manifest.name)
        rules = None
        if settings is not None:
            unknown = sorted(set(settings.inputs) - {s.name for s in manifest.inputs})
            if unknown:
                log.warning("capture.models.%s names inputs the model lacks: %s", manifest.name, ", ".join(unknown))
            rules = CaptureRules(settings)
        if monitor is None and rules is None and self.buffer is None:
            with self._lock:
                self._observers.pop(manifest.name, None)
            return None
        observer = ModelObserver(self, manifest, monitor, rules)
        with self._lock:
            self._observers[manifest.name] = observer
        self._ensure_thread()
        return observer

    # --- capture settings: agent.toml, else the operator's signed config -------------------------

    def capture_for(self, name: str) -> CaptureModelSettings | None:
        """The capture settings of model ``name``: ``[capture.models.NAME]``, else the operator's; None: none."""
        if self.buffer is None:
            return None
        local = self.capture_settings.models.get(name)
        return local if local is not None else self._remote.get(name, (0, None))[1]

    def configure(self, model: str, settings: dict[str, Any] | None, seq: int) -> bool:
        """Apply an operator's (already verified) capture config; False when refused (logged): capture off
        here, ``agent.toml`` sets this model, an old ``seq``, or settings that do not validate."""
        if self.buffer is None:
            log.warning("capture config for %s ignored: [capture] enabled is false on this device", model)
            return False
        if model in self.capture_settings.models:
            log.warning("capture config for %s ignored: agent.toml sets capture.models.%s", model, model)
            return False
        if seq <= self._remote.get(model, (0, None))[0]:
            log.info("capture config for %s with seq %d ignored: not newer", model, seq)
            return False
        try:
            parsed = None if settings is None else CaptureModelSettings.model_validate(settings)
        except ValueError as exc:
            log.warning("capture config for %s refused: %s", model, exc)
            return False
        self._remote[model] = (seq, parsed)
        kept = {m: {"seq": n, "settings": None if v is None else v.model_dump(mode="json")}
                for m, (n, v) in self._remote.items()}  # fmt: skip
        atomic_write_json(self.buffer.directory / REMOTE, kept)
        observer = self.observers().get(model)
        if observer is not None:
            observer.rules = None if parsed is None else CaptureRules(parsed)
        log.info("capture of %s %s by the operator's config (seq %d)", model, "on" if parsed else "off", seq)
        return True

    def _read_remote(self) -> dict[str, tuple[int, CaptureModelSettings | None]]:
        assert self.buffer is not None
        try:
            raw = read_json(self.buffer.directory / REMOTE)
            return {
                m: (
                    int(e["seq"]),
                    None if e["settings"] is None else CaptureModelSettings.model_validate(e["settings"]),
                )
                for m, e in raw.items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s unreadable (%s): the operator's capture configs are forgotten", REMOTE, exc)
            return {}

    def _reference(self, manifest: Manifest, digest: str) -> ReferenceStats | None:
        path = manifest.metadata.get(METADATA_KEY)
        if not isinstance(path, str) or path not in {f.path for f in manifest.files}:
            return None  # a bundle compiled before reference statistics, or without them
        return ReferenceStats.from_bytes((self.bundle_dir(digest) / path).read_bytes())

    # --- reading ---------------------------------------------------------------------------------

    def drift(self, name: str) -> DriftReport | None:
        with self._lock:
            observer = self._observers.get(name)
        if observer is None or observer.monitor is None or observer.disabled:
            return None
        return observer.monitor.report()

    def observers(self) -> dict[str, ModelObserver]:
        with self._lock:
            return dict(self._observers)

    def status(self) -> dict[str, Any]:
        return {
            "models": {name: o.status() for name, o in self.observers().items()},
            "skipped_queue_full": self.skipped_full,
            "capture": self.buffer.status() if self.buffer is not None else None,
        }

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until the queue is worked off (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(5.0)
            self._thread = None
        if self.buffer is not None:
            self.buffer.save()

    # --- the thread ------------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="edgepack-field-data", daemon=True)
                self._thread.start()

    def _enqueue(self, observer: ModelObserver, inputs: Mapping[str, np.ndarray],
                 outputs: Mapping[str, np.ndarray], stats: bool, capture: bool) -> None:  # fmt: skip
        nbytes = sum(int(np.asarray(a).nbytes) for a in (*inputs.values(), *outputs.values()))
        with self._lock:
            if self._queued_bytes + nbytes > self._max_bytes:
                observer.skipped += 1
                self.skipped_full += 1
                return
            self._queued_bytes += nbytes
        try:
            self._queue.put_nowait(_Job(observer, inputs, outputs, stats, capture, nbytes, time.time()))
        except queue.Full:
            with self._lock:
                self._queued_bytes -= nbytes
            observer.skipped += 1
            self.skipped_full += 1

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                with self._lock:
                    self._queued_bytes -= job.nbytes
                if job.observer.disabled is None:
                    try:
                        self._work(job)
                    except Exception as exc:  # the boundary: a bug here disables field data, serving goes on
                        job.observer.disable(exc)
            finally:
                self._queue.task_done()

    def _work(self, job: _Job) -> None:
        observer = job.observer
        level = None
        if job.stats and observer.monitor is not None and self.budget.allows():  # a burst queued: spent yet?
            start = time.perf_counter()
            observer.monitor.add(job.inputs, job.outputs)
            if start - observer.checked_at >= self.drift_settings.check_s:  # a report reads the whole window
                observer.checked_at = start
                level = observer.monitor.report().level
            self.budget.spend(time.perf_counter() - start)
            if level is not None and level != observer.last_level:
                previous, observer.last_level = observer.last_level, level
                if previous is not None and self.on_level_change is not None:
                    self.on_level_change(observer.name, level)
        rules = observer.rules  # the operator's config may replace them meanwhile
        if job.capture and rules is not None and self.buffer is not None:
            current = level or observer.last_level
            rule = rules.pick(job.outputs, current)
            if rule is not None and self.buffer.add(self._record(observer, rules, job, rule, current).to_bytes()):
                observer.captured += 1

    def _record(
        self, observer: ModelObserver, rules: CaptureRules, job: _Job, rule: str, level: str | None
    ) -> CaptureRecord:
        settings = rules.settings
        manifest = observer.manifest
        inputs = {n: np.asarray(job.inputs[n]) for n in settings.inputs if n in job.inputs}
        outputs = {n: np.asarray(a) for n, a in job.outputs.items()} if settings.outputs else {}
        meta: dict[str, Any] = {
            "model": manifest.name, "version": manifest.version, "rule": rule, "drift": level,
            "at": datetime.fromtimestamp(job.at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "stats_only": settings.stats_only,
        }  # fmt: skip
        if settings.stats_only:
            specs = {s.name: s for s in [*manifest.inputs, *manifest.outputs]}
            meta["stats"] = {
                f"{role}.{n}": channel_summary(a, channel_axis(specs[n]) if n in specs else None)
                for role, arrays in (("input", inputs), ("output", outputs))
                for n, a in arrays.items()
            }
            return CaptureRecord(meta)
        return CaptureRecord(meta, inputs, outputs)


def drift_status(agent: Any, name: str, top: int = 3) -> DriftStatus | None:
    """The device state's ``drift`` of model ``name`` (None: not watched); never raises (logs instead)."""
    try:
        report = agent.field_data.drift(name)
        return None if report is None else DriftStatus.model_validate(report.to_json(top))
    except Exception:
        log.exception("cannot report the drift of %s", name)
        return None


def capture_status(agent: Any) -> CaptureStatus | None:
    """The device state's ``capture`` (None: capture off); never raises (logs instead)."""
    try:
        buffer = agent.field_data.buffer
        return None if buffer is None else CaptureStatus.model_validate(buffer.status())
    except Exception:
        log.exception("cannot report the capture buffer")
        return None
