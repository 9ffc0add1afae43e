"""Small detector-shaped ONNX models built with ``onnx.helper`` and numpy (no PyTorch), and inputs for them.

* :func:`yolo_head` — YOLOv8-style: a conv backbone, a box branch in pixels (``Sigmoid * 640``, 0…640) and
  a class branch of probabilities (``Sigmoid``, 0…1, biased low as YOLO initialises it), concatenated on
  axis 1 into one output ``[1, 4 + classes, anchors]``. int8 with one scale for that tensor rounds every
  class probability to zero while the whole-tensor cosine, dominated by the boxes, stays near 1.
* :func:`text_detector` — DBNet-style, for memory: strided conv backbone, upsampling back to the input
  size, a sigmoid probability map ``[1, 1, H, W]`` (640×640 by default).
* :func:`blob_images` — inputs with a few bright blobs on noise, so detectors see something to score.

Weights are random (seeded), scaled so activations stay in a sane range; the shapes and the value
ranges are the point, not what the model detects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _conv(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    rng: np.random.Generator,
    x: str,
    cin: int,
    cout: int,
    name: str,
    *,
    stride: int = 1,
    kernel: int = 3,
    relu: bool = True,
    bias: float = 0.0,
    gain: float = 1.0,
) -> str:
    std = gain * np.sqrt(2.0 / (cin * kernel * kernel))
    w = rng.normal(0, std, (cout, cin, kernel, kernel)).astype(np.float32)
    b = np.full(cout, bias, np.float32) + rng.normal(0, 0.05, cout).astype(np.float32)
    inits += [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]
    pad = kernel // 2
    out = f"{name}_out"
    nodes.append(
        helper.make_node(
            "Conv", [x, f"{name}.w", f"{name}.b"], [out], name=name, strides=[stride, stride], pads=[pad] * 4
        )
    )
    if not relu:
        return out
    nodes.append(helper.make_node("Relu", [out], [f"{name}_relu"], name=f"{name}_relu"))
    return f"{name}_relu"


def yolo_head(path: Path, *, size: int = 64, classes: int = 8, seed: int = 0) -> Path:
    """YOLOv8-style model: input ``images`` [1, 3, size, size], output ``output0`` [1, 4 + classes, anchors]."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = _conv(nodes, inits, rng, "images", 3, 16, "stem", stride=2)
    x = _conv(nodes, inits, rng, x, 16, 32, "down1", stride=2)
    x = _conv(nodes, inits, rng, x, 32, 32, "down2", stride=2)
    anchors = (size // 8) ** 2
    box = _conv(nodes, inits, rng, x, 32, 4, "box", kernel=1, relu=False)
    cls = _conv(nodes, inits, rng, x, 32, classes, "cls", kernel=1, relu=False, bias=-4.0, gain=4.0)
    inits.append(numpy_helper.from_array(np.array([1, 4, anchors], np.int64), "box_shape"))
    inits.append(numpy_helper.from_array(np.array([1, classes, anchors], np.int64), "cls_shape"))
    inits.append(numpy_helper.from_array(np.array(640.0, np.float32), "pixels"))
    nodes += [
        helper.make_node("Reshape", [box, "box_shape"], ["box_flat"], name="box_reshape"),
        helper.make_node("Sigmoid", ["box_flat"], ["box_unit"], name="box_sigmoid"),
        helper.make_node("Mul", ["box_unit", "pixels"], ["boxes"], name="box_pixels"),
        helper.make_node("Reshape", [cls, "cls_shape"], ["cls_flat"], name="cls_reshape"),
        helper.make_node("Sigmoid", ["cls_flat"], ["scores"], name="cls_sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["output0"], name="head_concat", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "yolo_head",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + classes, anchors])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def text_detector(path: Path, *, size: int = 640, width: int = 16, seed: int = 0, outlier: float = 1.0) -> Path:
    """DBNet-style model: input ``x`` [1, 3, size, size], output ``maps`` [1, 1, size, size] (sigmoid).

    Backbone of stride-2 convs to 1/16, a 1/4-scale feature fused from the 1/8 and 1/16 ones (Resize x2 and
    Add), a head upsampled x4 (Resize) back to the input size and a Sigmoid: the large activations of a
    640×640 detector at a fraction of the weights. ``outlier`` > 1 scales one channel of the 1/4-scale
    backbone tensor by that factor and the next conv's weights reading it by the inverse (the tensor also
    feeds the FPN's Add, so the float model changes too): one per-tensor int8 scale cannot hold that
    channel and the others, plain int8 fails the bar (1e3: cosine 0.95) and the accuracy-aware search has
    to work."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    c = width
    s2 = _conv(nodes, inits, rng, "x", 3, c, "s2", stride=2)
    s4 = _conv(nodes, inits, rng, s2, c, c * 2, "s4", stride=2)
    s8 = _conv(nodes, inits, rng, s4, c * 2, c * 4, "s8", stride=2)
    s16 = _conv(nodes, inits, rng, s8, c * 4, c * 4, "s16", stride=2)
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up2"))
    inits.append(numpy_helper.from_array(np.array([1, 1, 4, 4], np.float32), "up4"))
    nodes.append(helper.make_node("Resize", [s16, "", "up2"], ["s16_up"], name="fpn_up16", mode="nearest"))
    nodes.append(helper.make_node("Add", ["s16_up", s8], ["p8"], name="fpn_add8"))
    p8 = _conv(nodes, inits, rng, "p8", c * 4, c * 2, "p8_conv", kernel=1)
    nodes.append(helper.make_node("Resize", [p8, "", "up2"], ["p8_up"], name="fpn_up8", mode="nearest"))
    nodes.append(helper.make_node("Add", ["p8_up", s4], ["p4"], name="fpn_add4"))
    head = _conv(nodes, inits, rng, "p4", c * 2, c, "head_conv")
    logits = _conv(nodes, inits, rng, head, c, 1, "head_out", kernel=1, relu=False)
    nodes.append(helper.make_node("Resize", [logits, "", "up4"], ["up"], name="head_up", mode="linear"))
    nodes.append(helper.make_node("Sigmoid", ["up"], ["maps"], name="head_sigmoid"))
    if outlier != 1.0:
        weights = {t.name: t for t in inits}
        for name, fn in (
            ("s4.w", lambda w: w.__setitem__(0, w[0] * outlier)),
            ("s4.b", lambda b: b.__setitem__(0, b[0] * outlier)),
            ("s8.w", lambda w: w.__setitem__((slice(None), 0), w[:, 0] / outlier)),
        ):
            array = numpy_helper.to_array(weights[name]).copy()
            fn(array)
            weights[name].CopyFrom(numpy_helper.from_array(array, name))
    graph = helper.make_graph(
        nodes,
        "text_detector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("maps", TensorProto.FLOAT, [1, 1, size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def blob_images(n: int, size: int, *, seed: int = 0) -> np.ndarray:
    """``n`` images [n, 3, size, size] in 0…1: noise plus a few bright Gaussian blobs each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = rng.random((n, 3, size, size), dtype=np.float32) * 0.2
    for i in range(n):
        for _ in range(3):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(size / 20, size / 6)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            images[i] += blob[None] * rng.uniform(0.4, 0.8, (3, 1, 1)).astype(np.float32)
    return np.clip(images, 0, 1).astype(np.float32)
