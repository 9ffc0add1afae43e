"""Fuse exact GELU subgraphs into ONNX ``Gelu`` nodes, for the ONNX → TFLite conversion.

Exporters write GELU as ``x * 0.5 * (1 + erf(x / √2))``: Div(x, √2) → Erf → Add(1) → Mul(x) → Mul(½).
TFLite has no Erf, so onnx2tf makes it from a dozen elementwise ops (its builtin-op "pseudo" Erf), which
int8 handles badly. A ``Gelu`` node instead becomes TFLite's own GELU op (onnx2tf's Gelu converter).
Measured on the benchmark ViT for rpi4 (``scripts/bench/bench_litert_transformer.py``, 1 thread): int8
19.6 ms with the pseudo Erf and 6.3 ms with GELU fused, and fp32 7.8 ms and 7.0 ms.

Hand-written because no library does it safely: onnxslim ships a GELU pattern but leaves it unregistered,
and it does not check the constants (√2, 1, ½), so any Div→Erf→Add→Mul→Mul would become a GELU;
onnxruntime's transformer optimizer fuses to its own ``com.microsoft`` Gelu, which onnx2tf does not read
as such. ``Gelu`` is in the ONNX standard from opset 20: an older model is converted to opset 20 first
(``onnx.version_converter``), and left as it is, with a log line, when that conversion fails.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

GELU_OPSET = 20
_SQRT2 = float(np.float32(np.sqrt(2.0)))


@dataclass(frozen=True)
class _Match:
    nodes: tuple[int, ...]  # positions of the five nodes in the graph, the Div first
    x: str
    y: str


def fuse_exact_gelu(
    proto: onnx.ModelProto, check_feed: Mapping[str, np.ndarray] | None = None
) -> tuple[onnx.ModelProto, int]:
    """``proto`` with every exact GELU subgraph as one ``Gelu`` node (opset raised to 20 if needed), and
    how many it fused; ``proto`` itself (and 0) when there is none or the opset cannot be raised.

    With ``check_feed`` both models run it in onnxruntime first, and the fused one is used only when every
    output agrees (GELU is exact to float rounding; an opset conversion that went wrong is not): fusing is an
    optimization and must never change what the model computes."""
    if not _matches(proto.graph):
        return proto, 0
    model = proto
    opset = next((i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")), 0)
    if opset < GELU_OPSET:
        try:
            model = onnx.version_converter.convert_version(proto, GELU_OPSET)
        except Exception as exc:  # the converter fails with many types; fusing is an optimization
            log.info("GELU not fused: converting opset %d to %d failed (%s)", opset, GELU_OPSET, exc)
            return proto, 0
    matches = _matches(model.graph)
    fused = {m.nodes[0]: m for m in matches}  # positions, not id(): protobuf hands out fresh wrappers
    removed = {i for m in matches for i in m.nodes}
    nodes = []
    for position, node in enumerate(model.graph.node):
        if position in fused:
            m = fused[position]
            nodes.append(helper.make_node("Gelu", [m.x], [m.y], name=f"{node.name or m.y}/gelu"))
        elif position not in removed:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if check_feed is not None and not _same_outputs(proto, model, check_feed):
        return proto, 0
    log.info("fused %d exact GELU subgraph(s) into Gelu nodes", len(matches))
    return model, len(matches)


def _same_outputs(original: onnx.ModelProto, fused: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> bool:
    import onnxruntime as ort

    try:
        runs = [
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, dict(feed))
            for m in (original, fused)
        ]
    except Exception as exc:  # onnxruntime fails with its own types; not fusing is always safe
        log.info("GELU not fused: the fused model does not run in onnxruntime (%s)", exc)
        return False
    for name, before, after in zip((o.name for o in original.graph.output), runs[0], runs[1], strict=True):
        if not np.allclose(before, after, rtol=1e-4, atol=1e-5):
            log.info("GELU not fused: output %r changed by up to %g", name, float(np.max(np.abs(before - after))))
            return False
    return True


def _matches(graph: onnx.GraphProto) -> list[_Match]:
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: _attribute_tensor(n) for n in graph.node if n.op_type == "Constant"})
    nodes = list(graph.node)
    consumers: dict[str, list[int]] = {}
    for position, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(position)
    graph_outputs = {o.name for o in graph.output}

    def scalar(name: str, value: float) -> bool:
        tensor = constants.get(name)
        if tensor is None:
            return False
        array = numpy_helper.to_array(tensor)
        return array.size == 1 and bool(np.isclose(float(array.reshape(-1)[0]), value, rtol=1e-6, atol=0.0))

    def only_reader(position: int | None, op: str) -> int | None:
        if position is None:
            return None
        output = nodes[position].output[0]
        readers = consumers.get(output, [])
        if len(readers) != 1 or nodes[readers[0]].op_type != op or output in graph_outputs:
            return None
        return readers[0]

    def other_inputs(position: int, previous: int) -> list[str]:
        return [i for i in nodes[position].input if i != nodes[previous].output[0]]

    found = []
    for div, node in enumerate(nodes):
        if node.op_type != "Div" or len(node.input) != 2 or not scalar(node.input[1], _SQRT2):
            continue
        x = node.input[0]
        erf = only_reader(div, "Erf")
        add = only_reader(erf, "Add")
        if add is None or erf is None or not any(scalar(i, 1.0) for i in other_inputs(add, erf)):
            continue
        mul = only_reader(add, "Mul")
        if mul is None or other_inputs(mul, add) != [x]:
            continue
        half = only_reader(mul, "Mul")
        if half is None or not any(scalar(i, 0.5) for i in other_inputs(half, mul)):
            continue
        found.append(_Match((div, erf, add, mul, half), x, nodes[half].output[0]))
    return found


def _attribute_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
            return attribute.t
    return None
