"""Reference statistics: a compact, fixed-size summary of a tensor's values, and the drift measures on it.

The compiler summarises the calibration data of every input (and the original model's outputs) into a
``refstats.json`` payload of the bundle (signed with it, like every payload; ``docs/bundle-format.md``);
the device (``agent/drift.py``) bins its live traffic into the *same* bins and compares. Both sides import
this module, and it needs numpy only, so nothing heavy reaches the device.

Per tensor the summary is per **channel group**: the values are split along the tensor's channel axis (the
``C`` of its ``layout``; else axis 1 for rank ≥ 2, else one channel), and when a tensor has more than
:data:`MAX_GROUPS` channels, neighbouring channels are pooled into that many groups. Per group:

* ``mean``, ``std``, ``min``, ``max`` of the finite values, ``finite`` (how many), and ``nonfinite``
  (share of NaN/±inf);
* ``edges``: at most :data:`BINS` − 1 interior bin edges, the calibration quantiles at 1/B … (B−1)/B
  (equal-mass bins, the usual choice for the population stability index), ties merged, padded with +inf
  to a fixed width; ``hist``: the calibration's share of finite values in each of the B bins
  (``(-inf, e0], (e0, e1], …, (e_last, +inf)``).

So a summary is ``O(groups × BINS)`` numbers whatever the data size: at most 64 × (10 + 9 + 7) floats
per tensor.

Drift measures (why these: standard, explainable, cheap with numpy on a device):

* **PSI** (population stability index) per group, ``Σ (a − e) · ln(a / e)`` over the bins, live share
  ``a`` against reference share ``e``, both floored at :data:`PSI_FLOOR`. Rule of thumb: < 0.1 stable,
  0.1–0.25 moderate shift, > 0.25 large shift.
* **out-of-range** share: finite live values below the reference ``min`` or above its ``max``.
* **non-finite** share beyond the reference's.

Why hand-written: the PSI and a fixed-bin histogram are a few lines of numpy; the statistics packages
that have them (scipy, evidently, alibi-detect) are far too heavy for a device.

Usage::

    stats = summarize(spec, [feed["x"] for feed in samples.feeds])          # compiler
    counts = LiveCounts.empty(stats); counts.add(stats, array)               # device, per request
    psi(stats, counts)                                                       # per group
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepack.errors import BundleFormatError
from edgepack.manifest import TensorSpec, canonical_json

FORMAT = "edgepack-refstats/1"
FILE_NAME = "refstats.json"
METADATA_KEY = "reference_stats"  # manifest.metadata[METADATA_KEY] = the payload path of the summary
MAX_GROUPS = 64
BINS = 10  # deciles: the usual PSI binning
PSI_FLOOR = 1e-4
QUANTILE_SAMPLE = 1 << 16  # values per group the deciles are computed from (an evenly spaced subsample)
NUMERIC = ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
           "float16", "bfloat16", "float32", "float64")  # fmt: skip


def channel_axis(spec: TensorSpec) -> int | None:
    """The axis values are split along: ``C`` of the layout, else 1 for rank ≥ 2; None: one channel."""
    rank = len(spec.shape)
    if spec.layout and "C" in spec.layout and len(spec.layout) == rank:
        return spec.layout.index("C")
    return 1 if rank >= 2 else None


def group_of(channels: int, groups: int) -> np.ndarray:
    """The group of each channel: neighbouring channels pooled evenly into ``groups``."""
    return (np.arange(channels) * groups // channels).astype(np.intp)


def by_channel(array: np.ndarray, axis: int | None) -> np.ndarray:
    """``array`` as ``[channels, values]`` float64-comparable values (no copy where the layout allows)."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if axis is None or a.ndim == 0:
        return a.reshape(1, -1)
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


@dataclass(frozen=True)
class TensorStats:
    """The reference summary of one tensor (see the module docstring); arrays are per group."""

    name: str
    role: str  # "input" or "output"
    axis: int | None
    channels: int
    samples: int
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    nonfinite: np.ndarray
    finite: np.ndarray  # finite values per group the summary saw (the PSI's reference sample size)
    edges: np.ndarray  # [groups, BINS - 1], +inf padded
    hist: np.ndarray  # [groups, BINS], each row sums to 1 (or 0 when a group had no finite value)

    @property
    def groups(self) -> int:
        return int(self.mean.shape[0])

    @property
    def grouping(self) -> np.ndarray:
        return group_of(self.channels, self.groups)

    def to_json(self) -> dict[str, Any]:
        def floats(a: np.ndarray) -> list[Any]:
            return [[_num(v) for v in row] for row in a] if a.ndim == 2 else [_num(v) for v in a]

        return {
            "name": self.name, "role": self.role, "axis": self.axis, "channels": self.channels,
            "samples": self.samples, "mean": floats(self.mean), "std": floats(self.std), "min": floats(self.min),
            "max": floats(self.max), "nonfinite": floats(self.nonfinite), "finite": floats(self.finite),
            "edges": floats(self.edges), "hist": floats(self.hist),
        }  # fmt: skip

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TensorStats:
        try:
            groups = len(raw["mean"])
            arrays = {k: np.asarray([_unnum(v) for v in raw[k]], dtype=np.float64)
                      for k in ("mean", "std", "min", "max", "nonfinite", "finite")}  # fmt: skip
            edges = np.asarray([[_unnum(v) for v in row] for row in raw["edges"]], dtype=np.float64)
            hist = np.asarray(raw["hist"], dtype=np.float64)
            stats = cls(
                name=str(raw["name"]), role=str(raw["role"]),
                axis=None if raw["axis"] is None else int(raw["axis"]), channels=int(raw["channels"]),
                samples=int(raw["samples"]), edges=edges, hist=hist, **arrays,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleFormatError(f"reference statistics: tensor entry is malformed ({exc})") from exc
        if (
            not 1 <= groups <= MAX_GROUPS
            or stats.channels < groups
            or any(a.shape != (groups,) for a in arrays.values())
            or edges.shape != (groups, BINS - 1)
            or hist.shape != (groups, BINS)
        ):
            raise BundleFormatError(f"reference statistics of {stats.name!r} have inconsistent sizes")
        return stats


@dataclass(frozen=True)
class ReferenceStats:
    """The summaries of a bundle's inputs and outputs, as stored in ``refstats.json``."""

    inputs: dict[str, TensorStats]
    outputs: dict[str, TensorStats]
    source: str = "calibration data"

    def to_bytes(self) -> bytes:
        return canonical_json({
            "format": FORMAT, "source": self.source,
            "inputs": [s.to_json() for s in self.inputs.values()],
            "outputs": [s.to_json() for s in self.outputs.values()],
        })  # fmt: skip

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceStats:
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise BundleFormatError(f"reference statistics are not valid JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise BundleFormatError(f"reference statistics format {found!r} is not {FORMAT!r}; upgrade edgepack")
        entries = [TensorStats.from_json(e) for e in raw.get("inputs", []) + raw.get("outputs", [])]
        return cls(
            inputs={s.name: s for s in entries if s.role == "input"},
            outputs={s.name: s for s in entries if s.role == "output"},
            source=str(raw.get("source", "")),
        )


def summarize(spec: TensorSpec, arrays: Sequence[np.ndarray], role: str = "input") -> TensorStats | None:
    """The reference summary of ``arrays`` (one per sample, shaped like ``spec``); None for a tensor that
    holds no numbers (strings) or no values.

    Streaming, in bounded memory whatever the number of samples: one pass for the moments, the range and an
    evenly spaced subsample of at most :data:`QUANTILE_SAMPLE` values per group (the deciles come from it),
    a second pass for the exact bin shares; one sample is converted to float64 at a time.
    """
    if spec.dtype not in NUMERIC or not arrays:
        return None
    axis = channel_axis(spec)

    def rows_of(a: np.ndarray) -> np.ndarray:
        return by_channel(a, axis if np.ndim(a) == len(spec.shape) else None).astype(np.float64, copy=False)

    channels = rows_of(arrays[0]).shape[0]
    if channels == 0:
        return None
    groups = min(channels, MAX_GROUPS)
    grouping = group_of(channels, groups)
    members = [np.flatnonzero(grouping == g) for g in range(groups)]
    total, finite_n, sums, sumsq = (np.zeros(groups) for _ in range(4))
    low, high = np.full(groups, np.inf), np.full(groups, -np.inf)
    sample: list[list[np.ndarray]] = [[] for _ in range(groups)]
    per_array = max(1, QUANTILE_SAMPLE // len(arrays))
    for array in arrays:
        rows = rows_of(array)
        if rows.shape[0] != channels:
            return None
        for g, idx in enumerate(members):
            v = rows[idx].ravel()
            total[g] += v.size
            v = v[np.isfinite(v)]
            if v.size == 0:
                continue
            finite_n[g] += v.size
            sums[g] += v.sum()
            sumsq[g] += np.square(v).sum()
            low[g], high[g] = min(low[g], v.min()), max(high[g], v.max())
            sample[g].append(v if v.size <= per_array else v[:: math.ceil(v.size / per_array)])
    if not total.any():
        return None
    edges = np.full((groups, BINS - 1), np.inf)
    for g in range(groups):
        if finite_n[g]:
            cut = np.unique(np.quantile(np.concatenate(sample[g]), np.arange(1, BINS) / BINS))
            cut = cut[cut < high[g]]  # a top edge at the maximum would leave the last bin empty
            edges[g, : cut.size] = cut
    counts = np.zeros((groups, BINS))
    for array in arrays:  # second pass: the exact share of every bin
        rows = rows_of(array)
        for g, idx in enumerate(members):
            v = rows[idx].ravel()
            v = v[np.isfinite(v)]
            counts[g] += np.bincount(np.searchsorted(edges[g], v, side="left"), minlength=BINS)[:BINS]
    mean = np.divide(sums, finite_n, out=np.zeros(groups), where=finite_n > 0)
    var = np.divide(sumsq, finite_n, out=np.zeros(groups), where=finite_n > 0) - mean**2
    return TensorStats(
        name=spec.name, role=role, axis=axis, channels=channels, samples=len(arrays), mean=mean,
        std=np.sqrt(np.maximum(var, 0.0)), min=low, max=high,
        nonfinite=np.divide(total - finite_n, total, out=np.zeros(groups), where=total > 0), finite=finite_n,
        edges=edges,
        hist=np.divide(counts, finite_n[:, None], out=np.zeros((groups, BINS)), where=finite_n[:, None] > 0),
    )  # fmt: skip


def summarize_all(
    specs: Sequence[TensorSpec], feeds: Iterable[dict[str, np.ndarray]], role: str
) -> dict[str, TensorStats]:
    feeds = list(feeds)
    out = {}
    for spec in specs:
        stats = summarize(spec, [f[spec.name] for f in feeds if spec.name in f], role)
        if stats is not None:
            out[spec.name] = stats
    return out


@dataclass
class LiveCounts:
    """Live values binned into a reference's bins, per group: what a drift window adds up.

    ``bins[g, :BINS]`` finite values per reference bin, ``bins[g, BINS]`` non-finite values; ``below`` /
    ``above`` finite values outside the reference range; ``total``/``sum``/``sumsq`` for mean and std.
    """

    bins: np.ndarray
    below: np.ndarray
    above: np.ndarray
    sum: np.ndarray
    sumsq: np.ndarray
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def empty(cls, stats: TensorStats) -> LiveCounts:
        g = stats.groups
        return cls(np.zeros((g, BINS + 1)), np.zeros(g), np.zeros(g), np.zeros(g), np.zeros(g))

    @classmethod
    def of(cls, stats: TensorStats, array: np.ndarray, max_values: int = 4096) -> LiveCounts:
        """Bin one live array (one request) into ``stats``' bins, looking at about ``max_values`` values
        (evenly spaced per channel): the bounded cost of one observation."""
        rows = by_channel(array, stats.axis if np.ndim(array) > 0 else None)
        if rows.shape[0] != stats.channels:
            rows = rows.reshape(1, -1) if stats.channels == 1 else rows
            if rows.shape[0] != stats.channels:
                raise ValueError(f"{stats.name}: {rows.shape[0]} channels, the reference has {stats.channels}")
        per_channel = max(1, max_values // stats.channels)
        if rows.shape[1] > per_channel:
            rows = rows[:, :: math.ceil(rows.shape[1] / per_channel)]
        v = rows.astype(np.float64)
        grouping = stats.grouping
        finite = np.isfinite(v)
        safe = np.where(finite, v, 0.0)
        bin_index = (safe[:, :, None] > stats.edges[grouping][:, None, :]).sum(axis=2)
        bin_index = np.where(finite, bin_index, BINS)
        g = stats.groups
        flat = (grouping[:, None] * (BINS + 1) + bin_index).ravel()
        bins = np.bincount(flat, minlength=g * (BINS + 1)).reshape(g, BINS + 1).astype(np.float64)
        lo, hi = stats.min[grouping][:, None], stats.max[grouping][:, None]
        per_c = np.stack([(finite & (v < lo)).sum(1), (finite & (v > hi)).sum(1), safe.sum(1), (safe * safe).sum(1)])
        grouped = np.stack([np.bincount(grouping, weights=row, minlength=g) for row in per_c])
        return cls(bins, grouped[0], grouped[1], grouped[2], grouped[3])

    def __iadd__(self, other: LiveCounts) -> LiveCounts:
        self.bins += other.bins
        self.below += other.below
        self.above += other.above
        self.sum += other.sum
        self.sumsq += other.sumsq
        return self

    def __isub__(self, other: LiveCounts) -> LiveCounts:
        self.bins -= other.bins
        self.below -= other.below
        self.above -= other.above
        self.sum -= other.sum
        self.sumsq -= other.sumsq
        return self

    @property
    def finite(self) -> np.ndarray:
        return self.bins[:, :BINS].sum(axis=1)

    @property
    def values(self) -> np.ndarray:
        return self.bins.sum(axis=1)


def psi(stats: TensorStats, live: LiveCounts, corrected: bool = True) -> np.ndarray:
    """The population stability index of each group (0 where the window holds no finite value).

    ``corrected``: minus its expected value when nothing drifted, ``(k − 1)·(1/n + 1/m)`` for k used bins,
    n live and m reference values (PSI is a symmetric KL divergence, ≈ χ²(k − 1)·(1/n + 1/m) under no
    drift), floored at 0: so 0.1/0.25 mean the same for a window of 300 values as for one of 300 000.
    """
    finite = live.finite
    share = np.divide(live.bins[:, :BINS], finite[:, None], out=np.zeros((stats.groups, BINS)),
                      where=finite[:, None] > 0)  # fmt: skip
    used = (stats.hist > 0) | (share > 0)
    a = np.maximum(share, PSI_FLOOR)
    e = np.maximum(stats.hist, PSI_FLOOR)
    terms = np.where(used, (a - e) * np.log(a / e), 0.0)
    value = terms.sum(axis=1)
    if corrected:
        k = (stats.hist > 0).sum(axis=1)
        bias = np.maximum(k - 1, 0) * (1.0 / np.maximum(finite, 1) + 1.0 / np.maximum(stats.finite, 1))
        value = np.maximum(0.0, value - bias)
    return np.where(finite > 0, value, 0.0)


def out_of_range(live: LiveCounts) -> np.ndarray:
    finite = live.finite
    return np.divide(live.below + live.above, finite, out=np.zeros_like(finite), where=finite > 0)


def nonfinite_excess(stats: TensorStats, live: LiveCounts) -> np.ndarray:
    """Share of non-finite live values beyond the reference's share (never negative)."""
    values = live.values
    share = np.divide(live.bins[:, BINS], values, out=np.zeros_like(values), where=values > 0)
    return np.maximum(0.0, share - stats.nonfinite)


def live_mean(live: LiveCounts) -> np.ndarray:
    finite = live.finite
    return np.divide(live.sum, finite, out=np.zeros_like(finite), where=finite > 0)


def _num(value: float) -> Any:
    """JSON has no inf/NaN: ±inf as the strings "inf"/"-inf" (bounds of empty groups and edge padding)."""
    f = float(value)
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    if math.isnan(f):
        return "nan"
    return f


def _unnum(value: Any) -> float:
    if isinstance(value, str):
        if value not in ("inf", "-inf", "nan"):
            raise ValueError(f"{value!r} is not a number")
        return float(value)
    return float(value)
