"""Drift of one serving model: live inputs over a sliding window against the bundle's reference statistics.

A :class:`DriftMonitor` holds, per tensor of the bundle's ``refstats.json``, the live values of the last
``window`` requests it was shown, binned into the reference's bins (:class:`edgepack.refstats.LiveCounts`).
The window slides by :data:`BUCKETS` steps: requests add up in the newest bucket of ``window / BUCKETS``
requests, and the oldest bucket leaves when a new one starts, so the window holds between
``window × (1 − 1/BUCKETS)`` and ``window`` requests and costs ``BUCKETS × groups × bins`` numbers per
tensor, whatever the window's length or the traffic. A report reads the sum of the buckets. Which requests
it is shown, and on which thread, is ``agent/field_data.py``'s business (sampled, off the request path).

Judging, per input channel group (outputs are reported, not judged: a confident model on new data is the
case drift must catch):

* PSI ≥ ``psi_alarm`` (0.25) → alarm, ≥ ``psi_warn`` (0.1) → warn;
* out-of-range share ≥ ``range_alarm`` / ``range_warn``;
* non-finite share beyond the reference's ≥ ``nonfinite_alarm`` / ``nonfinite_warn``.

A channel is judged once the window holds ``min_values`` of its values (a PSI on a few values is biased
upwards by about (bins − 1) / values); until any is, the level is ``collecting``. The model's level is its
worst channel's; the report names the worst channels.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepack.agent.config import DriftSettings
from edgepack.refstats import LiveCounts, ReferenceStats, TensorStats, live_mean, nonfinite_excess, out_of_range, psi

BUCKETS = 16
LEVELS = ("collecting", "ok", "warn", "alarm")
RANK = {level: i for i, level in enumerate(LEVELS)}


@dataclass(frozen=True)
class ChannelDrift:
    """One channel group of one tensor: its measures over the window and what they make it."""

    tensor: str
    channel: int  # group index (a channel, unless the tensor has more than refstats.MAX_GROUPS channels)
    level: str
    psi: float
    out_of_range: float
    nonfinite: float
    mean: float
    reference_mean: float

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor, "channel": self.channel, "level": self.level, "psi": round(self.psi, 4),
            "out_of_range": round(self.out_of_range, 4), "nonfinite": round(self.nonfinite, 4),
            "mean": round(self.mean, 4), "reference_mean": round(self.reference_mean, 4),
        }  # fmt: skip


@dataclass(frozen=True)
class DriftReport:
    """A model's drift now: its level, how many requests the window holds, and the worst channels."""

    level: str
    window: int
    observed: int
    worst: list[ChannelDrift]
    channels: list[ChannelDrift] = field(default_factory=list)  # every input channel (for /metrics)
    outputs: list[ChannelDrift] = field(default_factory=list)  # reported, never judged

    def to_json(self, top: int = 3) -> dict[str, Any]:
        return {
            "level": self.level,
            "window": self.window,
            "observed": self.observed,
            "worst": [c.to_json() for c in self.worst[:top]],
        }


class DriftMonitor:
    """The sliding window of one model (thread-safe: one thread adds, any thread reports)."""

    def __init__(self, stats: ReferenceStats, settings: DriftSettings) -> None:
        self.stats = stats
        self.settings = settings
        self._tensors: dict[str, TensorStats] = {**stats.inputs, **stats.outputs}
        self._bucket_size = max(1, settings.window // BUCKETS)
        self._buckets: deque[tuple[int, dict[str, LiveCounts]]] = deque()  # (requests, counts), newest last
        self._observed = 0
        self._lock = threading.Lock()

    @property
    def tensors(self) -> list[str]:
        return list(self._tensors)

    def add(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Bin one request's tensors (those with reference statistics) into the window."""
        counts = {}
        for name, stats in self._tensors.items():
            array = inputs.get(name) if name in self.stats.inputs else outputs.get(name)
            if array is not None:
                counts[name] = LiveCounts.of(stats, array, self.settings.max_values)
        with self._lock:
            if not self._buckets or self._buckets[-1][0] >= self._bucket_size:
                self._buckets.append((0, {n: LiveCounts.empty(s) for n, s in self._tensors.items()}))
                while sum(n for n, _ in self._buckets) > self.settings.window - self._bucket_size:
                    if len(self._buckets) == 1:
                        break
                    self._buckets.popleft()
            requests, newest = self._buckets[-1]
            for name, c in counts.items():
                newest[name] += c
            self._buckets[-1] = (requests + 1, newest)
            self._observed += 1

    def report(self) -> DriftReport:
        with self._lock:
            totals = {name: LiveCounts.empty(s) for name, s in self._tensors.items()}
            for _, bucket in self._buckets:
                for name, c in bucket.items():
                    totals[name] += c
            window, observed = sum(n for n, _ in self._buckets), self._observed
        inputs = [c for name in self.stats.inputs for c in self._channels(self.stats.inputs[name], totals[name])]
        outputs = [c for name in self.stats.outputs for c in self._channels(self.stats.outputs[name], totals[name])]
        judged = [c for c in inputs if c.level != "collecting"]
        level = max((c.level for c in judged), key=RANK.__getitem__, default="collecting")
        worst = sorted(judged, key=lambda c: (RANK[c.level], c.psi, c.out_of_range, c.nonfinite), reverse=True)
        return DriftReport(level=level, window=window, observed=observed, worst=worst, channels=inputs,
                           outputs=outputs)  # fmt: skip

    def _channels(self, stats: TensorStats, live: LiveCounts) -> list[ChannelDrift]:
        s = self.settings
        p, oor, nf = psi(stats, live), out_of_range(live), nonfinite_excess(stats, live)
        means = live_mean(live)
        enough_finite, enough = live.finite >= s.min_values, live.values >= s.min_values
        out = []
        for g in range(stats.groups):
            level = "collecting"
            if enough[g]:
                level = "ok"
                if nf[g] >= s.nonfinite_alarm:
                    level = "alarm"
                elif nf[g] >= s.nonfinite_warn:
                    level = "warn"
            if enough_finite[g]:
                if p[g] >= s.psi_alarm or oor[g] >= s.range_alarm:
                    level = "alarm"
                elif (p[g] >= s.psi_warn or oor[g] >= s.range_warn) and level != "alarm":
                    level = "warn"
            out.append(
                ChannelDrift(
                    stats.name,
                    g,
                    level,
                    float(p[g]),
                    float(oor[g]),
                    float(nf[g]),
                    float(means[g]),
                    float(stats.mean[g]),
                )
            )
        return out
