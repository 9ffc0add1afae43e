"""Per-node error analysis of an int8 model against its float original, on calibration data.

Finds where quantization hurts. Every tensor the QDQ model quantizes is compared with the same tensor of
the float model (signal-to-quantization-noise ratio, SQNR, in dB), and each node is charged with the
SQNR it *loses*: its output's SQNR against the best of its inputs'. Collecting the tensors uses
onnxruntime's own debugging helpers (``onnxruntime.quantization.qdq_loss_debug``); the scoring is ours:

* against the float model, not the tensor before its QuantizeLinear — onnxruntime folds a ReLU into the
  quantization of the tensor before it, so "before Q" and "after DQ" differ by the ReLU, not the error;
* per channel (axis 1 for NCHW-like tensors, the last axis for [rows, features]), worst channel counts —
  one per-tensor scale over channels of very different ranges (an outlier channel, box coordinates
  concatenated with class scores) leaves the whole-tensor SQNR fine while the small channels are rounded
  to nothing, and those are the cases that break models.

Quantized weights are scored too (per output channel); with per-channel weights they rarely matter.
Each finding names the nodes that keep its tensor in float when excluded from quantization: its producer
and every consumer (onnxruntime quantizes a tensor if any neighbour is quantized).
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger(__name__)

# What an 8-bit uniform quantizer keeps at best (6.02 * 8 + 1.76 dB): the loss of a tensor with nothing
# quantized upstream (a graph input) is measured from here.
_IDEAL_INT8_DB = 50.0
# A weight is charged only with the SQNR it has below this (per-channel int8 weights sit near 40 dB).
_WEIGHT_SQNR_OK_DB = 30.0


@dataclass(frozen=True)
class NodeError:
    """One quantized tensor or weight and how much int8 costs it."""

    tensor: str
    kind: str  # "activation" or "weight"
    worst_channel_sqnr_db: float  # against the float model
    sqnr_db: float  # whole tensor
    loss_db: float  # SQNR lost at this tensor (the ranking key)
    nodes: tuple[str, ...]  # nodes to keep in float so this tensor stays float

    def reason(self) -> str:
        return (
            f"{self.kind} {self.tensor!r} loses {self.loss_db:.1f} dB under int8: worst channel SQNR "
            f"{self.worst_channel_sqnr_db:.1f} dB vs the float model (whole tensor {self.sqnr_db:.1f} dB)"
        )


def analyse(float_model: Path, qdq_model: Path, feeds: Sequence[dict[str, np.ndarray]]) -> list[NodeError]:
    """Tensors and weights of ``qdq_model`` that int8 hurts, the most harmful first."""
    from onnxruntime.quantization.qdq_loss_debug import create_weight_matching

    proto = onnx.load(str(float_model), load_external_data=False)
    graph = proto.graph
    shapes = _shapes(proto)
    neighbours = _neighbours(graph)
    producers = {out: node for node in graph.node for out in node.output if out}
    scores = {
        tensor: value
        for tensor, value in _streamed_scores(float_model, qdq_model, feeds, shapes).items()
        if tensor in neighbours
    }

    def upstream(tensor: str, seen: set[str]) -> list[float]:
        """Scores of the nearest scored tensors feeding ``tensor``'s producer."""
        producer = producers.get(tensor)
        found: list[float] = []
        for name in producer.input if producer is not None else ():
            if name in seen:
                continue
            seen.add(name)
            found.extend([scores[name][0]] if name in scores else upstream(name, seen))
        return found

    findings: list[NodeError] = []
    for tensor, (worst, whole) in scores.items():
        before = upstream(tensor, {tensor})
        loss = (max(before) if before else _IDEAL_INT8_DB) - worst
        findings.append(NodeError(tensor, "activation", worst, whole, loss, neighbours[tensor]))
    for weight, values in create_weight_matching(str(float_model), str(qdq_model)).items():
        if weight not in neighbours:
            continue
        worst, whole = _scores(np.asarray(values["float"]), np.asarray(values["dequantized"]), axis=0)
        findings.append(NodeError(weight, "weight", worst, whole, _WEIGHT_SQNR_OK_DB - worst, neighbours[weight]))
    findings = [f for f in findings if f.loss_db > 0]
    findings.sort(key=lambda f: (-f.loss_db, f.worst_channel_sqnr_db))
    return findings


def _streamed_scores(
    float_model: Path, qdq_model: Path, feeds: Sequence[dict[str, np.ndarray]], shapes: dict[str, list[int | None]]
) -> dict[str, tuple[float, float]]:
    """(worst-channel, whole-tensor) SQNR of every quantized activation against the float model.

    Streamed: both models run one feed at a time (onnxruntime's augmented models, every tensor an
    output), each tensor's per-channel signal and noise energies are summed, and the sample's tensors are
    dropped before the next one. Holding every activation of every sample (what onnxruntime's
    ``collect_activations`` does) took a 640×640 detector past 24 GB; this holds one sample's.
    """
    import onnxruntime
    from onnxruntime.quantization.qdq_loss_debug import (
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    sums: dict[str, _EnergySums] = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-nodes-") as tmp:
        sessions = []
        for label, model in (("float", float_model), ("qdq", qdq_model)):
            augmented = Path(tmp) / f"{label}-augmented.onnx"
            modify_model_output_intermediate_tensors(str(model), str(augmented))
            sessions.append(onnxruntime.InferenceSession(str(augmented), options, providers=["CPUExecutionProvider"]))
        for feed in feeds:
            float_acts, qdq_acts = (_one_run(session, feed) for session in sessions)
            matched = create_activation_matching(qdq_acts, float_acts)
            del float_acts, qdq_acts
            for tensor, values in matched.items():
                post, ref = values.get("post_qdq"), values.get("float")
                if post is None or ref is None:
                    continue
                shape = shapes.get(tensor)
                sums.setdefault(tensor, _EnergySums()).add(_cat(ref, shape), _cat(post, shape))
            del matched
    return {tensor: s.scores() for tensor, s in sums.items()}


def _one_run(session: object, feed: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """One feed through an augmented model: {tensor name: [value]} (the saved-tensor outputs only)."""
    from onnxruntime.quantization.qdq_loss_debug import _TENSOR_SAVE_POSTFIX

    outputs = session.get_outputs()  # type: ignore[attr-defined]
    values = session.run(None, feed)  # type: ignore[attr-defined]
    return {
        o.name[: -len(_TENSOR_SAVE_POSTFIX)]: [v]
        for o, v in zip(outputs, values, strict=True)
        if o.name.endswith(_TENSOR_SAVE_POSTFIX)
    }


class _EnergySums:
    """Running per-channel signal and noise energies of one tensor over samples (see :func:`_scores`)."""

    def __init__(self) -> None:
        self.signal: np.ndarray | None = None
        self.noise: np.ndarray | None = None
        self.whole_signal = 0.0
        self.whole_noise = 0.0

    def add(self, reference: np.ndarray, quantized: np.ndarray) -> None:
        ref = reference.astype(np.float64)
        noise = ref - quantized.astype(np.float64)
        self.whole_signal += float(np.sum(ref * ref))
        self.whole_noise += float(np.sum(noise * noise))
        if ref.ndim < 2:
            return
        axis = 1 if ref.ndim >= 3 else ref.ndim - 1
        other = tuple(i for i in range(ref.ndim) if i != axis)
        signal, error = np.sum(ref * ref, axis=other), np.sum(noise * noise, axis=other)
        if self.signal is None or self.noise is None or self.signal.shape != signal.shape:
            self.signal, self.noise = signal, error
        else:
            self.signal = self.signal + signal
            self.noise = self.noise + error

    def scores(self) -> tuple[float, float]:
        whole = _sqnr(self.whole_signal, self.whole_noise)
        if self.signal is None or self.noise is None:
            return whole, whole
        live = self.signal > 0
        if not np.any(live):
            return whole, whole
        worst = min(_sqnr(float(s), float(e)) for s, e in zip(self.signal[live], self.noise[live], strict=True))
        return worst, whole


def _cat(values: Sequence[np.ndarray], shape: list[int | None] | None) -> np.ndarray:
    """Samples (flattened by onnxruntime's helper) back in their tensor shape, joined on axis 0."""
    arrays = [np.asarray(v) for v in values]
    if shape and len(shape) >= 2 and all(d is not None for d in shape[1:]):
        rest = [int(d) for d in shape[1:]]  # type: ignore[arg-type]
        if all(a.size % max(1, int(np.prod(rest))) == 0 for a in arrays):
            arrays = [a.reshape(-1, *rest) for a in arrays]
            return np.concatenate(arrays)
    return np.concatenate([a.reshape(-1) for a in arrays])


def _shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Shapes of the graph's tensors from shape inference; a dynamic dimension is None."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes: dict[str, list[int | None]] = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def name_nodes(proto: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (nodes are excluded from quantization by name)."""
    used = {n.name for n in proto.graph.node if n.name}
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _neighbours(graph: onnx.GraphProto) -> dict[str, tuple[str, ...]]:
    """tensor name -> names of its producer and consumers."""
    nodes: dict[str, list[str]] = {}
    for node in graph.node:
        for name in [*node.input, *node.output]:
            if name:
                nodes.setdefault(name, []).append(node.name)
    return {tensor: tuple(dict.fromkeys(n for n in names if n)) for tensor, names in nodes.items()}


def _scores(reference: np.ndarray, quantized: np.ndarray, axis: int | None = None) -> tuple[float, float]:
    """(worst-channel SQNR, whole-tensor SQNR) in dB."""
    ref = reference.astype(np.float64)
    noise = ref - quantized.astype(np.float64)
    whole = _sqnr(float(np.sum(ref * ref)), float(np.sum(noise * noise)))
    if ref.ndim < 2:
        return whole, whole
    if axis is None:
        axis = 1 if ref.ndim >= 3 else ref.ndim - 1
    other = tuple(i for i in range(ref.ndim) if i != axis)
    signal = np.sum(ref * ref, axis=other)
    error = np.sum(noise * noise, axis=other)
    live = signal > 0
    if not np.any(live):
        return whole, whole
    worst = min(_sqnr(float(s), float(e)) for s, e in zip(signal[live], error[live], strict=True))
    return worst, whole


def _sqnr(signal: float, noise: float) -> float:
    if noise <= 0.0:
        return 200.0  # exact: as good as it gets
    if signal <= 0.0:
        return -200.0
    return 10.0 * math.log10(signal / noise)
