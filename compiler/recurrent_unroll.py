"""Unroll ONNX ``LSTM`` nodes into MatMul/Sigmoid/Tanh steps, for the ONNX → TFLite conversion.

onnx2tf turns an ONNX ``LSTM`` into a Keras LSTM layer, which fails on the models that carry their
recurrent state in and out — a streaming voice-activity detector (Silero-VAD style: inputs ``input``,
``state``; outputs ``output``, ``stateN``) gives Keras an initial state of shape ``(128, 1)`` and it refuses:
"An `initial_state` was passed that is not compatible with `cell.state_size` … [128, 128]". An LSTM of a
static sequence length is only a few matrix products per step, which every converter and runtime handles
(and int8 quantizes as well as any MatMul). So the copy onnx2tf gets has each such LSTM written out, per
time step ``t`` (ONNX's gate order i, o, f, c)::

    gates = x_t · Wᵀ + h · Rᵀ + (Wb + Rb);  i, o, f = σ(·);  c̃ = tanh(·)
    c = f ⊙ c + i ⊙ c̃;  h = o ⊙ tanh(c)

Handled: forward or reverse direction, optional bias and initial state, default activations, no clip,
``layout`` 0, no peepholes, no ``sequence_lens``, a static sequence length (≤ :data:`MAX_STEPS`), opset ≥ 13.
Anything else is left as it is (onnx2tf may still take it; if it fails, its error names the node). As with
the GELU fusion, the rewritten model runs the first sample in onnxruntime beside the original and is used
only when every output agrees: the rewrite must never change what the model computes.

Hand-written because no converter offers it: onnx2tf has no switch that avoids the Keras LSTM layer, and
``onnxsim``/``onnxslim`` keep LSTM nodes whole.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

MAX_STEPS = 64  # longer sequences would make the unrolled graph larger than it is worth
_MIN_OPSET = 13  # Split/Squeeze/Unsqueeze take their sizes and axes as inputs
_DEFAULT_ACTIVATIONS = (b"Sigmoid", b"Tanh", b"Tanh")


def unroll_lstms(
    proto: onnx.ModelProto, check_feed: Mapping[str, np.ndarray] | None = None
) -> tuple[onnx.ModelProto, list[str]]:
    """``proto`` with every LSTM it can unroll written out (see the module docstring), and their names;
    ``proto`` itself and ``[]`` when there is none or the check fails."""
    opset = next((i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")), 0)
    if opset < _MIN_OPSET or not any(n.op_type == "LSTM" for n in proto.graph.node):
        return proto, []
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = _static_shapes(inferred.graph)
    weights = {t.name: t for t in proto.graph.initializer}
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    nodes: list[onnx.NodeProto] = []
    unrolled: list[str] = []
    for node in proto.graph.node:
        reason = _unsupported(node, shapes, weights) if node.op_type == "LSTM" else "not an LSTM"
        if reason is not None:
            if node.op_type == "LSTM":
                log.info("LSTM %r left as it is: %s", node.name, reason)
            nodes.append(node)
            continue
        new_nodes, new_inits = _unroll(node, shapes, weights)
        nodes.extend(new_nodes)
        model.graph.initializer.extend(new_inits)
        unrolled.append(node.name)
    if not unrolled:
        return proto, []
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for n in nodes for name in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if check_feed is not None and not _same_outputs(proto, model, check_feed):
        return proto, []
    log.info("unrolled %d LSTM node(s): %s", len(unrolled), ", ".join(unrolled))
    return model, unrolled


def why_not_unrolled(proto: onnx.ModelProto, node_name: str) -> str:
    """Why the recurrent node ``node_name`` of ``proto`` is not unrolled, for the error a user reads."""
    node = next((n for n in proto.graph.node if n.name == node_name), None)
    if node is None:
        return "it is not in the graph"
    if node.op_type != "LSTM":
        return f"only LSTM nodes are unrolled, this is {node.op_type}"
    opset = next((i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")), 0)
    if opset < _MIN_OPSET:
        return f"the model's opset {opset} is below {_MIN_OPSET}"
    shapes = _static_shapes(onnx.shape_inference.infer_shapes(proto).graph)
    weights = {t.name: t for t in proto.graph.initializer}
    return _unsupported(node, shapes, weights) or "the unrolled graph did not reproduce the LSTM's outputs"


def _unsupported(
    node: onnx.NodeProto, shapes: dict[str, list[int]], weights: Mapping[str, onnx.TensorProto]
) -> str | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inputs = list(node.input) + [""] * (8 - len(node.input))
    if attrs.get("direction", b"forward") not in (b"forward", b"reverse"):
        return "bidirectional"
    if attrs.get("layout", 0) != 0:
        return "layout 1"
    if "clip" in attrs or attrs.get("input_forget", 0):
        return "clip or input_forget"
    if tuple(attrs.get("activations", _DEFAULT_ACTIVATIONS)) != _DEFAULT_ACTIVATIONS:
        return "non-default activations"
    if inputs[4] or inputs[7]:
        return "sequence_lens or peepholes"
    if inputs[1] not in weights or inputs[2] not in weights or (inputs[3] and inputs[3] not in weights):
        return "W, R or B is not an initializer"
    x_shape = shapes.get(inputs[0])
    if x_shape is None or len(x_shape) != 3:
        return "the input's shape is not static"
    if x_shape[0] > MAX_STEPS:
        return f"sequence length {x_shape[0]} > {MAX_STEPS}"
    return None


def _unroll(
    node: onnx.NodeProto, shapes: dict[str, list[int]], weights: Mapping[str, onnx.TensorProto]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inputs = list(node.input) + [""] * (8 - len(node.input))
    outputs = list(node.output) + [""] * (3 - len(node.output))
    steps, batch, _features = shapes[inputs[0]]
    w = numpy_helper.to_array(weights[inputs[1]])[0]  # [4h, in]
    r = numpy_helper.to_array(weights[inputs[2]])[0]  # [4h, h]
    hidden = r.shape[1]
    bias = np.zeros(8 * hidden, np.float32)
    if inputs[3]:
        bias = numpy_helper.to_array(weights[inputs[3]])[0]
    p = f"{node.name or 'lstm'}/unrolled"
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(w.T).astype(np.float32), f"{p}/WT"),
        numpy_helper.from_array(np.ascontiguousarray(r.T).astype(np.float32), f"{p}/RT"),
        numpy_helper.from_array((bias[: 4 * hidden] + bias[4 * hidden :]).astype(np.float32), f"{p}/B"),
        numpy_helper.from_array(np.array([hidden] * 4, np.int64), f"{p}/split"),
        numpy_helper.from_array(np.array([0], np.int64), f"{p}/axis0"),
        numpy_helper.from_array(np.array([0, 1], np.int64), f"{p}/axes01"),
        numpy_helper.from_array(np.zeros((batch, hidden), np.float32), f"{p}/zeros"),
        numpy_helper.from_array(np.array([batch, hidden], np.int64), f"{p}/state_shape"),
    ]
    nodes: list[onnx.NodeProto] = []

    def add(op: str, ins: list[str], out: str, **kwargs: object) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=f"{out}_op", **kwargs))
        return out

    # Reshape, not Squeeze: onnx2tf follows a Reshape's target shape, whatever layout it gave the state
    h = add("Reshape", [inputs[5], f"{p}/state_shape"], f"{p}/h_init") if inputs[5] else f"{p}/zeros"
    c = add("Reshape", [inputs[6], f"{p}/state_shape"], f"{p}/c_init") if inputs[6] else f"{p}/zeros"
    order = range(steps) if attrs.get("direction", b"forward") == b"forward" else range(steps - 1, -1, -1)
    per_step: dict[int, str] = {}
    for t in order:
        s = f"{p}/t{t}"
        inits.append(numpy_helper.from_array(np.array(t, np.int64), f"{s}/index"))
        x_t = add("Gather", [inputs[0], f"{s}/index"], f"{s}/x", axis=0)
        xw = add("MatMul", [x_t, f"{p}/WT"], f"{s}/xw")
        hr = add("MatMul", [h, f"{p}/RT"], f"{s}/hr")
        gates = add("Add", [add("Add", [xw, hr], f"{s}/sum"), f"{p}/B"], f"{s}/gates")
        names = [f"{s}/{g}_pre" for g in "iofc"]
        nodes.append(helper.make_node("Split", [gates, f"{p}/split"], names, name=f"{s}/split", axis=1))
        i = add("Sigmoid", [names[0]], f"{s}/i")
        o = add("Sigmoid", [names[1]], f"{s}/o")
        f = add("Sigmoid", [names[2]], f"{s}/f")
        g = add("Tanh", [names[3]], f"{s}/g")
        c = add("Add", [add("Mul", [f, c], f"{s}/fc"), add("Mul", [i, g], f"{s}/ig")], f"{s}/c")
        h = add("Mul", [o, add("Tanh", [c], f"{s}/tanh_c")], f"{s}/h")
        per_step[t] = h
    if outputs[0]:
        parts = [add("Unsqueeze", [per_step[t], f"{p}/axes01"], f"{p}/y{t}") for t in range(steps)]
        if len(parts) == 1:
            nodes.append(helper.make_node("Identity", parts, [outputs[0]], name=f"{p}/y"))
        else:
            nodes.append(helper.make_node("Concat", parts, [outputs[0]], name=f"{p}/y", axis=0))
    if outputs[1]:
        nodes.append(helper.make_node("Unsqueeze", [h, f"{p}/axis0"], [outputs[1]], name=f"{p}/y_h"))
    if outputs[2]:
        nodes.append(helper.make_node("Unsqueeze", [c, f"{p}/axis0"], [outputs[2]], name=f"{p}/y_c"))
    return nodes, inits


def _static_shapes(graph: onnx.GraphProto) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            shapes[value.name] = [int(d.dim_value) for d in dims]
    return shapes


def _same_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> bool:
    import onnxruntime as ort

    try:
        runs = [
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, dict(feed))
            for m in (original, rewritten)
        ]
    except Exception as exc:  # onnxruntime fails with its own types; not unrolling is always safe
        log.info("LSTM not unrolled: the rewritten model does not run in onnxruntime (%s)", exc)
        return False
    for name, before, after in zip((o.name for o in original.graph.output), runs[0], runs[1], strict=True):
        if not np.allclose(before, after, rtol=1e-4, atol=1e-5):
            log.info("LSTM not unrolled: output %r changed by up to %g", name, float(np.max(np.abs(before - after))))
            return False
    return True
