"""A ResNet-style CNN built directly with onnx.helper (random weights), for benchmarks that need a
realistic convolutional workload without a model hub or a training run.

    resnet_like(path, image=64, width=32, blocks=4)   # writes an ONNX file, input "input" [1,3,H,W]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def resnet_like(
    path: Path,
    *,
    image: int = 64,
    width: int = 32,
    blocks: int = 4,
    classes: int = 10,
    seed: int = 0,
    batch: int | str = 1,
) -> Path:
    """``batch``: the first dimension, a size or a name (dynamic: any batch, for dynamic batching)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(inp: str, cin: int, cout: int, stride: int = 1, relu: bool = True) -> str:
        name = f"conv{len(nodes)}"
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.01).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")])
        nodes.append(
            helper.make_node(
                "Conv", [inp, f"{name}.w", f"{name}.b"], [f"{name}.y"], pads=[1, 1, 1, 1], strides=[stride, stride]
            )
        )
        if not relu:
            return f"{name}.y"
        nodes.append(helper.make_node("Relu", [f"{name}.y"], [f"{name}.r"]))
        return f"{name}.r"

    x = conv("input", 3, width, stride=2)
    channels = width
    for i in range(blocks):
        if i and i % 2 == 0:
            x = conv(x, channels, channels * 2, stride=2)
            channels *= 2
        y = conv(conv(x, channels, channels), channels, channels, relu=False)
        nodes.append(helper.make_node("Add", [x, y], [f"add{i}"]))
        nodes.append(helper.make_node("Relu", [f"add{i}"], [f"block{i}"]))
        x = f"block{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"]))
    fc = (rng.standard_normal((channels, classes)) * 0.1).astype(np.float32)
    inits.append(numpy_helper.from_array(fc, "fc.w"))
    nodes.append(helper.make_node("MatMul", ["flat", "fc.w"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "resnet_like",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
