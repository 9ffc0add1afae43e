"""Pipeline step 4: how far the compiled model's outputs are from the original's, and whether that is allowed.

Per output, over every sample: max and mean absolute difference and cosine similarity (per sample, then
averaged; the worst sample is kept too). Outputs that hold class scores — rank 2, [rows, classes] with
classes >= 2 — also get top-1 agreement (how often both models pick the same class), and, when labels
are given, each model's accuracy. Integer outputs (indices, ids) get exact agreement instead.

The bar (:class:`AccuracyBar`, default): top-1 agreement >= 99 %, labelled accuracy may drop by at most
1 point, and outputs that are not class scores keep cosine similarity >= 0.99. ``--max-accuracy-drop X``
sets the labelled drop to X points and the agreement floor to 100 - X.

An output whose parts live on different scales (boxes in pixels concatenated with class probabilities;
:mod:`edgepack.compiler.output_slices` finds them) is judged per slice as well: every slice must keep the
cosine bar on its own, because the whole-tensor numbers are the large part's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgepack.compiler.output_slices import OutputSlices, find_slices
from edgepack.manifest import TensorSpec

Outputs = Sequence[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class AccuracyBar:
    """What the compiled model must keep. Percent and points are on a 0–100 scale."""

    max_accuracy_drop: float = 1.0
    min_top1_agreement: float = 99.0
    min_cosine: float = 0.99

    @classmethod
    def from_max_drop(cls, points: float) -> AccuracyBar:
        return cls(max_accuracy_drop=points, min_top1_agreement=max(0.0, 100.0 - points))


@dataclass
class SliceReport:
    """One slice of an output judged on its own (see :mod:`edgepack.compiler.output_slices`)."""

    label: str  # "output0[axis 1, 4:84]"
    axis: int
    start: int
    end: int
    scale: float  # RMS of the original model's values in the slice
    max_abs_diff: float
    cosine_mean: float
    cosine_min: float


@dataclass
class OutputReport:
    """Measured differences of one output."""

    name: str
    kind: str  # "class_scores", "values" or "integers"
    max_abs_diff: float
    mean_abs_diff: float
    cosine_mean: float | None
    cosine_min: float | None
    top1_agreement: float | None = None  # percent
    accuracy_reference: float | None = None  # percent, with labels
    accuracy_compiled: float | None = None
    slices: list[SliceReport] = field(default_factory=list)
    slices_from: str | None = None  # where the slices came from ("Concat node 'x'", "value ranges", ...)

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy_reference is None or self.accuracy_compiled is None:
            return None
        return self.accuracy_reference - self.accuracy_compiled


@dataclass
class AccuracyReport:
    """The comparison over all outputs, the bar it was held to and what failed it."""

    samples: int
    outputs: list[OutputReport]
    bar: AccuracyBar
    failures: list[str] = field(default_factory=list)
    data: str = ""  # where the samples came from

    @property
    def passed(self) -> bool:
        return not self.failures

    def margin(self) -> float:
        """How comfortably the bar holds (larger is better; negative: failed). For ranking tries."""
        margins = []
        for out in self.outputs:
            if out.top1_agreement is not None:
                margins.append(out.top1_agreement - self.bar.min_top1_agreement)
            if out.accuracy_drop is not None:
                margins.append(self.bar.max_accuracy_drop - out.accuracy_drop)
            if out.kind == "values" and out.cosine_mean is not None:
                margins.append((out.cosine_mean - self.bar.min_cosine) * 100.0)
            margins.extend((s.cosine_mean - self.bar.min_cosine) * 100.0 for s in out.slices)
        return min(margins) if margins else 0.0

    def failing_outputs(self) -> list[str]:
        """Names of the outputs that fail the bar in any way (whole tensor, agreement or a slice)."""
        bar = self.bar
        failing = []
        for out in self.outputs:
            whole = out.kind == "values" and out.cosine_mean is not None and out.cosine_mean < bar.min_cosine
            agree = out.top1_agreement is not None and out.top1_agreement < bar.min_top1_agreement
            drop = out.accuracy_drop is not None and out.accuracy_drop > bar.max_accuracy_drop
            if whole or agree or drop or any(s.cosine_mean < bar.min_cosine for s in out.slices):
                failing.append(out.name)
        return failing

    def failing_slices(self) -> list[str]:
        """Names of the outputs that fail the bar in one of their slices (the search keeps their concat float)."""
        return [out.name for out in self.outputs if any(s.cosine_mean < self.bar.min_cosine for s in out.slices)]

    def summary(self) -> str:
        parts = []
        for out in self.outputs:
            bits = [f"max|d| {out.max_abs_diff:.3g}"]
            if out.cosine_mean is not None:
                bits.append(f"cos {out.cosine_mean:.4f}")
            for sl in out.slices:
                bits.append(f"[{sl.start}:{sl.end}] cos {sl.cosine_mean:.4f}")
            if out.top1_agreement is not None:
                bits.append(f"top-1 agree {out.top1_agreement:.1f}%")
            if out.accuracy_drop is not None:
                bits.append(f"acc {out.accuracy_reference:.2f}% -> {out.accuracy_compiled:.2f}%")
            parts.append(f"{out.name}: " + ", ".join(bits))
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "data": self.data,
            "passed": self.passed,
            "bar": asdict(self.bar),
            "failures": list(self.failures),
            "outputs": {o.name: _output_dict(o) for o in self.outputs},
        }


def compare_outputs(
    reference: Outputs,
    compiled: Outputs,
    specs: Sequence[TensorSpec],
    *,
    labels: np.ndarray | None = None,
    bar: AccuracyBar = AccuracyBar(),
    data: str = "",
    slices: Mapping[str, OutputSlices] | None = None,
) -> AccuracyReport:
    """Compare per-sample outputs of the original (``reference``) and compiled model.

    ``slices``: outputs to judge per slice as well (the pipeline finds them once, from the graph and the
    reference outputs); None finds them from the reference values alone."""
    if len(reference) != len(compiled) or not reference:
        raise ValueError(f"need as many compiled as reference samples (>0): {len(reference)} vs {len(compiled)}")
    if slices is None:
        slices = find_slices(reference, specs)
    reports = []
    labelled_done = False
    for spec in specs:
        ref = [np.asarray(r[spec.name]) for r in reference]
        got = [np.asarray(c[spec.name]) for c in compiled]
        report = _compare_one(spec, ref, got)
        if spec.name in slices and report.kind != "integers":
            report.slices = _compare_slices(slices[spec.name], ref, got)
            report.slices_from = slices[spec.name].source
        if labels is not None and report.kind == "class_scores" and not labelled_done:
            _labelled(report, ref, got, labels)
            labelled_done = True
        reports.append(report)
    result = AccuracyReport(samples=len(reference), outputs=reports, bar=bar, data=data)
    result.failures = _failures(result)
    return result


def is_class_scores(spec: TensorSpec) -> bool:
    """Rank-2 float output [rows, classes] with at least two classes."""
    return (
        spec.dtype.startswith(("float", "bfloat"))
        and len(spec.shape) == 2
        and isinstance(spec.shape[1], int)
        and spec.shape[1] >= 2
    )


def _compare_one(spec: TensorSpec, ref: list[np.ndarray], got: list[np.ndarray]) -> OutputReport:
    if ref[0].dtype.kind in "iub":
        equal = [float(np.mean(r == g)) for r, g in zip(ref, got, strict=True)]
        diffs = [np.abs(r.astype(np.float64) - g.astype(np.float64)) for r, g in zip(ref, got, strict=True)]
        return OutputReport(
            name=spec.name,
            kind="integers",
            max_abs_diff=float(max(d.max() if d.size else 0.0 for d in diffs)),
            mean_abs_diff=float(np.mean([d.mean() if d.size else 0.0 for d in diffs])),
            cosine_mean=None,
            cosine_min=None,
            top1_agreement=100.0 * float(np.mean(equal)),
        )
    diffs = [np.abs(r.astype(np.float64) - g.astype(np.float64)) for r, g in zip(ref, got, strict=True)]
    cosines = [_cosine(r, g) for r, g in zip(ref, got, strict=True)]
    report = OutputReport(
        name=spec.name,
        kind="class_scores" if is_class_scores(spec) else "values",
        max_abs_diff=float(max(d.max() if d.size else 0.0 for d in diffs)),
        mean_abs_diff=float(np.mean([d.mean() if d.size else 0.0 for d in diffs])),
        cosine_mean=float(np.mean(cosines)),
        cosine_min=float(np.min(cosines)),
    )
    if report.kind == "class_scores":
        r_top = np.concatenate([r.reshape(-1, r.shape[-1]).argmax(-1) for r in ref])
        g_top = np.concatenate([g.reshape(-1, g.shape[-1]).argmax(-1) for g in got])
        report.top1_agreement = 100.0 * float(np.mean(r_top == g_top))
    return report


def _compare_slices(slices: OutputSlices, ref: list[np.ndarray], got: list[np.ndarray]) -> list[SliceReport]:
    reports = []
    for index, (start, end) in enumerate(slices.bounds):
        cut = (slice(None),) * slices.axis + (slice(start, end),)
        cosines = [_cosine(r[cut], g[cut]) for r, g in zip(ref, got, strict=True)]
        diff = max(float(np.max(np.abs(r[cut].astype(np.float64) - g[cut]))) for r, g in zip(ref, got, strict=True))
        scale = slices.scales[index] if index < len(slices.scales) else float("nan")
        reports.append(
            SliceReport(
                slices.label(index),
                slices.axis,
                start,
                end,
                scale,
                diff,
                float(np.mean(cosines)),
                float(np.min(cosines)),
            )
        )
    return reports


def _labelled(report: OutputReport, ref: list[np.ndarray], got: list[np.ndarray], labels: np.ndarray) -> None:
    r_top = np.concatenate([r.reshape(-1, r.shape[-1]).argmax(-1) for r in ref])
    g_top = np.concatenate([g.reshape(-1, g.shape[-1]).argmax(-1) for g in got])
    truth = np.asarray(labels).reshape(-1)
    if truth.shape[0] != r_top.shape[0]:
        return  # labels for another output layout; nothing to score
    report.accuracy_reference = 100.0 * float(np.mean(r_top == truth))
    report.accuracy_compiled = 100.0 * float(np.mean(g_top == truth))


def _failures(result: AccuracyReport) -> list[str]:
    bar = result.bar
    failures = []
    for out in result.outputs:
        if out.top1_agreement is not None and out.top1_agreement < bar.min_top1_agreement:
            what = "top-1 agreement" if out.kind == "class_scores" else "exact agreement"
            failures.append(f"{out.name}: {what} {out.top1_agreement:.2f}% < {bar.min_top1_agreement:.2f}%")
        drop = out.accuracy_drop
        if drop is not None and drop > bar.max_accuracy_drop:
            failures.append(
                f"{out.name}: labelled accuracy dropped {drop:.2f} points "
                f"({out.accuracy_reference:.2f}% -> {out.accuracy_compiled:.2f}%) > {bar.max_accuracy_drop:g}"
            )
        if out.kind == "values" and out.cosine_mean is not None and out.cosine_mean < bar.min_cosine:
            failures.append(f"{out.name}: cosine similarity {out.cosine_mean:.4f} < {bar.min_cosine}")
        for sl in out.slices:
            if sl.cosine_mean < bar.min_cosine:
                others = ", ".join(f"{o.start}:{o.end} ~{o.scale:.3g}" for o in out.slices if o is not sl)
                failures.append(
                    f"{sl.label}: cosine similarity {sl.cosine_mean:.4f} < {bar.min_cosine} in this slice (values "
                    f"~{sl.scale:.3g}; the output joins slices of other scales: {others}; {out.slices_from}; "
                    f"whole tensor {out.cosine_mean:.4f})"
                )
    return failures


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x = a.astype(np.float64).ravel()
    y = b.astype(np.float64).ravel()
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        return 1.0
    if nx == 0.0 or ny == 0.0 or not (math.isfinite(nx) and math.isfinite(ny)):
        return 0.0
    return float(np.dot(x, y) / (nx * ny))


def _output_dict(out: OutputReport) -> dict[str, Any]:
    values = {k: v for k, v in asdict(out).items() if k not in ("name", "slices", "slices_from")}
    result = _clean(values)
    if out.slices:
        result["slices_from"] = out.slices_from
        result["slices"] = [_clean({k: v for k, v in asdict(s).items()}) for s in out.slices]
    return result


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe: no NaN/inf (the manifest refuses them), rounded floats."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, float):
            out[key] = round(value, 6) if math.isfinite(value) else None
        else:
            out[key] = value
    return out
