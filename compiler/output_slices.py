"""Outputs whose parts live on different scales: find the slices, so the accuracy bar judges each one.

A YOLOv8-style detector returns one tensor ``[1, 4 + classes, anchors]`` that concatenates box coordinates
in pixels (0…640) with class probabilities (0…1) on axis 1. Whole-tensor metrics of such an output are
the boxes' metrics: int8 with one scale for the tensor rounds every probability to zero (the detections
are gone) while the cosine over the whole tensor stays at 0.99999. So the bar
(:mod:`edgepack.compiler.compare`) judges each *slice* of such an output on its own, and the accuracy-aware
int8 search keeps the concatenation in float when a slice fails (:func:`concat_nodes`).

Where the slices come from, first match wins:

1. ``--output-slices NAME:AXIS:START-END,START-END,...`` (END exclusive), the user's word;
2. the graph: the output is made by a ``Concat`` (through ``Identity``/``Reshape``-free paths only), whose
   inputs' static sizes along its axis are the slices;
3. the values: along one non-batch axis the per-index RMS of the reference outputs splits into two
   groups more than a factor :data:`MIXED_SCALE_RATIO` apart, forming 2 to :data:`MAX_SLICES` contiguous
   runs, *at the same indices in every sample* (an output built some other way, or a TFLite source). The
   last condition tells a concatenation from a map: a 640×640 text detector's probability map has empty
   paper margins whose columns are a million times quieter than the text, but where they are moves from
   image to image; judging those margins' 1e-6 values by their own cosine failed every int8 model.

Slices from 2 and 3 are used only when their scales (RMS of the original model's values) differ by at
least :data:`MIXED_SCALE_RATIO`: a concatenation of parts on one scale is judged whole, as before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from edgepack.errors import ConfigError
from edgepack.manifest import TensorSpec

log = logging.getLogger(__name__)

# Parts of one output whose RMS differ by this factor or more are judged apart (one decade).
MIXED_SCALE_RATIO = 10.0
# A value-based split into more runs than this is not a concatenation (e.g. a heat map's bright rows).
MAX_SLICES = 4
# Ops between a Concat and the graph output that do not mix its slices.
_PASS_THROUGH = frozenset({"Identity"})

Outputs = Sequence[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class OutputSlices:
    """How one output is cut for the bar: ``axis`` of the per-sample array, half-open ``bounds``."""

    output: str
    axis: int
    bounds: tuple[tuple[int, int], ...]
    source: str  # "--output-slices", "Concat node 'x'", "value ranges"
    scales: tuple[float, ...] = ()  # RMS of the original model's values per slice

    def label(self, index: int) -> str:
        start, end = self.bounds[index]
        return f"{self.output}[axis {self.axis}, {start}:{end}]"

    def to_dict(self) -> dict[str, object]:
        return {
            "axis": self.axis,
            "bounds": [list(b) for b in self.bounds],
            "source": self.source,
            "scales": [float(f"{s:.4g}") for s in self.scales],
        }


def parse_output_slices(values: Sequence[str]) -> dict[str, tuple[int, list[tuple[int, int]]]]:
    """``NAME:AXIS:START-END,START-END`` values -> {name: (axis, bounds)}; ConfigError on a bad one."""
    parsed: dict[str, tuple[int, list[tuple[int, int]]]] = {}
    for value in values:
        name, axis_text, ranges = value.rsplit(":", 2) if value.count(":") >= 2 else ("", "", "")
        try:
            axis = int(axis_text)
            bounds = []
            for part in ranges.split(","):
                start, _, end = part.partition("-")
                bounds.append((int(start), int(end)))
        except ValueError:
            bounds, axis = [], 0
        if not name or not bounds or any(s < 0 or e <= s for s, e in bounds):
            raise ConfigError(
                f"--output-slices {value!r}: expected NAME:AXIS:START-END,START-END,... with END > START >= 0 "
                "(END exclusive), e.g. output0:1:0-4,4-84"
            )
        parsed[name] = (axis, sorted(bounds))
    return parsed


def find_slices(
    reference: Outputs,
    specs: Sequence[TensorSpec],
    proto: onnx.ModelProto | None = None,
    overrides: Mapping[str, tuple[int, Sequence[tuple[int, int]]]] | None = None,
) -> dict[str, OutputSlices]:
    """The outputs of mixed scales and their slices (see the module docstring for the rules)."""
    overrides = dict(overrides or {})
    names = {s.name for s in specs}
    unknown = [n for n in overrides if n not in names]
    if unknown:
        raise ConfigError(
            f"--output-slices names {', '.join(map(repr, unknown))}, which the model does not output; "
            f"its outputs are {', '.join(sorted(names))}"
        )
    concat = _concat_slices(proto, specs) if proto is not None else {}
    found: dict[str, OutputSlices] = {}
    for spec in specs:
        if not reference or spec.name not in reference[0]:
            continue
        sample = np.asarray(reference[0][spec.name])
        if sample.dtype.kind != "f" or sample.ndim < 2:
            if spec.name in overrides:
                raise ConfigError(
                    f"--output-slices {spec.name}: output {spec.name!r} is not a float tensor of rank >= 2"
                )
            continue
        values = [np.asarray(r[spec.name]) for r in reference]
        if spec.name in overrides:
            axis, bounds = overrides[spec.name]
            found[spec.name] = _checked_override(spec.name, sample.shape, axis, bounds, values)
            continue
        candidate = concat.get(spec.name)
        fits = candidate is not None and candidate.axis < sample.ndim
        if candidate is not None and fits and candidate.bounds[-1][1] == sample.shape[candidate.axis]:
            scales = _slice_rms(values, candidate.axis, candidate.bounds)
            if _mixed(scales):
                found[spec.name] = OutputSlices(spec.name, candidate.axis, candidate.bounds, candidate.source, scales)
            continue
        by_values = _value_slices(spec.name, values)
        if by_values is not None:
            found[spec.name] = by_values
    for slices in found.values():
        log.info("output %r judged per slice (%s): %s", slices.output, slices.source, slices.to_dict())
    return found


def concat_nodes(proto: onnx.ModelProto, output: str) -> tuple[str, ...]:
    """Nodes that keep ``output``'s concatenation and the tensors it joins in float: the ``Concat`` that makes
    it (through pass-through ops, which are named too) and the producers of the Concat's inputs."""
    producers = {out: node for node in proto.graph.node for out in node.output if out}
    names: list[str] = []
    node = producers.get(output)
    while node is not None and node.op_type in _PASS_THROUGH:
        names.append(node.name)
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Concat":
        return ()
    names.append(node.name)
    for tensor in node.input:
        producer = producers.get(tensor)
        if producer is not None and producer.name not in names:
            names.append(producer.name)
    return tuple(n for n in names if n)


# --- the three sources ----------------------------------------------------------------------------


def _checked_override(
    name: str, shape: tuple[int, ...], axis: int, bounds: Sequence[tuple[int, int]], values: list[np.ndarray]
) -> OutputSlices:
    rank = len(shape)
    if not -rank <= axis < rank:
        raise ConfigError(f"--output-slices {name}: axis {axis} is out of range for output shape {list(shape)}")
    axis %= rank
    size = shape[axis]
    if bounds[-1][1] > size:
        raise ConfigError(
            f"--output-slices {name}: slice end {bounds[-1][1]} is past axis {axis}'s size {size} "
            f"(output shape {list(shape)})"
        )
    return OutputSlices(name, axis, tuple(bounds), "--output-slices", _slice_rms(values, axis, bounds))


def _concat_slices(proto: onnx.ModelProto, specs: Sequence[TensorSpec]) -> dict[str, OutputSlices]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    graph = inferred.graph
    shapes: dict[str, list[int | None]] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    producers = {out: node for node in graph.node for out in node.output if out}
    found: dict[str, OutputSlices] = {}
    for spec in specs:
        node = producers.get(spec.name)
        while node is not None and node.op_type in _PASS_THROUGH:
            node = producers.get(node.input[0])
        if node is None or node.op_type != "Concat" or len(node.input) < 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        rank = len(spec.shape)
        if not -rank <= axis < rank:
            continue
        axis %= rank
        sizes = [
            (shapes.get(t) or [None] * rank)[axis] if len(shapes.get(t) or []) == rank else None for t in node.input
        ]
        if any(s is None or s <= 0 for s in sizes):
            continue
        bounds, start = [], 0
        for size in sizes:
            bounds.append((start, start + int(size)))  # type: ignore[arg-type]
            start += int(size)  # type: ignore[arg-type]
        found[spec.name] = OutputSlices(spec.name, axis, tuple(bounds), f"Concat node {node.name!r}")
    return found


def _value_slices(name: str, values: list[np.ndarray]) -> OutputSlices | None:
    """Split along the non-batch axis whose per-index RMS falls into two groups a decade apart or more."""
    best: tuple[float, int, list[tuple[int, int]]] | None = None
    ndim = values[0].ndim
    for axis in range(1, ndim):
        size = values[0].shape[axis]
        if size < 2 or size > 4096:
            continue
        rms = _index_rms(values, axis)
        live = rms[rms > 0]
        if live.size < 2:
            continue
        logs = np.sort(np.log10(live))
        gaps = np.diff(logs)
        at = int(np.argmax(gaps))
        gap = float(gaps[at])
        if gap < math.log10(MIXED_SCALE_RATIO):
            continue
        threshold = 10 ** ((logs[at] + logs[at + 1]) / 2)
        big = rms >= threshold
        bounds, start = [], 0
        for i in range(1, size + 1):
            if i == size or big[i] != big[start]:
                bounds.append((start, i))
                start = i
        if not 2 <= len(bounds) <= MAX_SLICES:
            continue
        if not _same_in_every_sample(values, axis, threshold, big):
            continue
        if best is None or gap > best[0]:
            best = (gap, axis, bounds)
    if best is None:
        return None
    _gap, axis, bounds = best
    return OutputSlices(name, axis, tuple(bounds), "value ranges", _slice_rms(values, axis, bounds))


def _same_in_every_sample(values: list[np.ndarray], axis: int, threshold: float, big: np.ndarray) -> bool:
    """A concatenation puts its parts at the same indices in every sample (box rows are always in pixels);
    a map's quiet regions move with the content (a text detector's empty paper margins). True when every
    sample splits ``axis`` at ``threshold`` the way the samples together do (``big``)."""
    if len(values) < 2:
        return True
    return all(np.array_equal(_index_rms([v], axis) >= threshold, big) for v in values)


# --- numbers --------------------------------------------------------------------------------------


def _index_rms(values: list[np.ndarray], axis: int) -> np.ndarray:
    """RMS of each index along ``axis`` over every sample (streamed: one sample at a time)."""
    total: np.ndarray | None = None
    count = 0
    for v in values:
        other = tuple(i for i in range(v.ndim) if i != axis)
        squares = np.sum(np.square(v.astype(np.float64)), axis=other)
        total = squares if total is None else total + squares
        count += v.size // v.shape[axis]
    assert total is not None
    return np.sqrt(total / max(count, 1))


def _slice_rms(values: list[np.ndarray], axis: int, bounds: Sequence[tuple[int, int]]) -> tuple[float, ...]:
    rms = _index_rms(values, axis)
    return tuple(float(np.sqrt(np.mean(np.square(rms[s:e])))) for s, e in bounds)


def _mixed(scales: Sequence[float]) -> bool:
    live = [s for s in scales if s > 0]
    return len(live) >= 2 and max(live) >= MIXED_SCALE_RATIO * min(live)
