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
from collections.abc import Mapping, Sequence
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
        if weight not in neighbours or np.asarray(values["float"]).size < 2:
            # a scalar constant (an Add's or Mul's second input) has no channels to lose, and onnxruntime's
            # matching dequantizes it with the wrong parameters (-6 dB on every one of a detector's; keeping
            # all of them float changed its output not at all): not a finding
            continue
        worst, whole = _scores(np.asarray(values["float"]), np.asarray(values["dequantized"]), axis=0)
        findings.append(NodeError(weight, "weight", worst, whole, _WEIGHT_SQNR_OK_DB - worst, neighbours[weight]))
    findings = [f for f in findings if f.loss_db > 0]
    findings.sort(key=lambda f: (-f.loss_db, f.worst_channel_sqnr_db))
    return findings


def analysis_samples(feeds: Sequence[dict[str, np.ndarray]], per_sample_bytes: int) -> int:
    """How many of ``feeds`` the analysis runs: all (up to 16) for small models, fewer for models whose one
    sample's quantized activations are large (a 640×640 detector's hold millions of values per tensor,
    plenty for an SQNR), at least :data:`MIN_ANALYSIS_SAMPLES` — the analysis time stays bounded."""
    fit = ANALYSIS_TOTAL_BYTES // max(per_sample_bytes, 1)
    return max(min(len(feeds), MIN_ANALYSIS_SAMPLES), min(len(feeds), MAX_ANALYSIS_SAMPLES, int(fit)))


MIN_ANALYSIS_SAMPLES, MAX_ANALYSIS_SAMPLES = 4, 16
# Values (float and int8 side, all samples) one analysis streams through at most, before the 4-sample floor.
ANALYSIS_TOTAL_BYTES = 2 * 2**30


def _streamed_scores(
    float_model: Path,
    qdq_model: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    shapes: dict[str, list[int | None]],
    budget_bytes: int | None = None,
) -> dict[str, tuple[float, float]]:
    """(worst-channel, whole-tensor) SQNR of every quantized activation against the float model.

    Streamed per sample *and* per tensor: the quantized tensors are split into groups whose values for one
    sample (float and int8 side together) fit in ``budget_bytes`` (:data:`ANALYSIS_GROUP_BYTES`); for each
    group both models run with only that group's tensors as extra outputs, one feed at a time, and each
    tensor's per-channel signal and noise energies are summed before the next feed. Holding every
    activation of every sample (what onnxruntime's ``collect_activations`` does) took a 640×640 detector
    past 24 GB; even one sample's every activation was 4 GB. This holds one group of one sample.
    """
    import onnxruntime

    budget = budget_bytes if budget_bytes is not None else ANALYSIS_GROUP_BYTES
    float_proto = onnx.load(str(float_model), load_external_data=False)
    qdq_proto = onnx.load(str(qdq_model))
    pairs = quantized_activations(float_proto, qdq_proto)
    feeds = feeds[: analysis_samples(feeds, 2 * activation_bytes(shapes, [t for t, _ in pairs]))]
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    sums: dict[str, EnergySums] = {}
    groups = _groups(pairs, shapes, budget)
    log.info("int8 analysis: %d quantized tensors in %d group(s), %d sample(s)", len(pairs), len(groups), len(feeds))
    with tempfile.TemporaryDirectory(prefix="edgepack-nodes-") as tmp:
        for index, group in enumerate(groups):
            sessions = []
            for label, proto, names in (
                ("float", float_proto, [t for t, _ in group]),
                ("qdq", qdq_proto, [q for _, q in group]),
            ):
                path = Path(tmp) / f"{label}-{index}.onnx"
                onnx.save(_with_outputs(proto, names), str(path))
                sessions.append(onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
            wanted = [[t for t, _ in group], [q for _, q in group]]
            for feed in feeds:
                ref_values, q_values = (s.run(names, feed) for s, names in zip(sessions, wanted, strict=True))
                for (tensor, _), ref, post in zip(group, ref_values, q_values, strict=True):
                    if ref.shape != post.shape:
                        continue
                    sums.setdefault(tensor, EnergySums()).add(ref, post)
                del ref_values, q_values
            del sessions
    return {tensor: s.scores() for tensor, s in sums.items()}


# One group of the streamed analysis: the float and int8 values of its tensors for one sample.
ANALYSIS_GROUP_BYTES = 256 * 2**20


def quantized_activations(float_proto: onnx.ModelProto, qdq_proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """(float tensor, its dequantized twin in the QDQ model) for every activation the QDQ model quantizes
    (onnxruntime names a DequantizeLinear's output ``<tensor>_DequantizeLinear_Output``, ``..._1`` when
    there are two)."""
    from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX, QUANT_INPUT_SUFFIX

    weights = {t.name for t in float_proto.graph.initializer}
    produced = {o for n in float_proto.graph.node for o in n.output} | {i.name for i in float_proto.graph.input}
    pairs: dict[str, str] = {}
    for node in qdq_proto.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0].endswith(QUANT_INPUT_SUFFIX):
            # a graph output: its producer writes "<tensor>_QuantizeLinear_Input", the DequantizeLinear "<tensor>"
            tensor = node.input[0][: -len(QUANT_INPUT_SUFFIX)]
            if tensor in produced:
                pairs.setdefault(tensor, tensor)
            continue
        if node.op_type != "DequantizeLinear":
            continue
        out = node.output[0]
        for suffix in (DEQUANT_OUTPUT_SUFFIX, DEQUANT_OUTPUT_SUFFIX + "_1"):
            if out.endswith(suffix):
                tensor = out[: -len(suffix)]
                if tensor in produced and tensor not in weights:
                    pairs.setdefault(tensor, out)
                break
    return list(pairs.items())


def activation_bytes(shapes: Mapping[str, list[int | None]], tensors: Sequence[str]) -> int:
    """Bytes of one sample's float32 values of ``tensors`` (from inferred shapes; unknown dims count 1)."""
    return sum(4 * int(np.prod([d or 1 for d in shapes.get(t) or [1]])) for t in tensors)


def _groups(
    pairs: Sequence[tuple[str, str]], shapes: Mapping[str, list[int | None]], budget: int
) -> list[list[tuple[str, str]]]:
    """``pairs`` in graph order cut into groups of at most ``budget`` bytes (float + int8 side) per sample."""
    groups: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    size = 0
    for pair in pairs:
        cost = 2 * activation_bytes(shapes, [pair[0]])
        if current and size + cost > budget:
            groups.append(current)
            current, size = [], 0
        current.append(pair)
        size += cost
    if current:
        groups.append(current)
    return groups


def _with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``proto`` that also outputs the tensors ``names`` (graph outputs already there are kept)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            present.add(name)
    return model


class EnergySums:
    """Running per-channel signal and noise energies of one tensor over samples (see :func:`_scores`).

    ``channel_axis``: the channels' axis; None is axis 1 for rank >= 3 (NCHW), else the last axis. One
    instance per tensor holds a few numbers per channel, never the tensor's values."""

    def __init__(self, channel_axis: int | None = None) -> None:
        self.channel_axis = channel_axis
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
        axis = self.channel_axis % ref.ndim if self.channel_axis is not None else (1 if ref.ndim >= 3 else ref.ndim - 1)
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
