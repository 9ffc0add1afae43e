"""Small real ONNX models and bundles for agent and end-to-end tests.

``linear_model(scale)`` is y = x @ (scale * W) + b with x [batch, 4], y [batch, 3]; different scales give
distinguishable models, so a response tells which version answered.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgepack.bundle import BundleFile, write_bundle
from edgepack.keys import SigningKey
from edgepack.manifest import Manifest, RuntimeRequirement, SelfTest, TensorSpec
from edgepack.selftest import write_vectors

BASE_W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10.0
BASE_B = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def linear_reference(x: np.ndarray, scale: float) -> np.ndarray:
    return x @ (scale * BASE_W) + BASE_B


def linear_model(path: Path, scale: float) -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(scale * BASE_W, "w"), numpy_helper.from_array(BASE_B, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def linear_bundle(
    workdir: Path,
    key: SigningKey,
    *,
    name: str = "linear",
    version: str = "1.0.0",
    scale: float = 1.0,
    target: str = "x86",
    selftest_scale: float | None = None,
    samples: int = 4,
    pad: int = 0,
) -> tuple[Path, Manifest]:
    """A signed bundle of ``linear_model(scale)``; ``selftest_scale`` != scale makes its self-test fail;
    ``pad`` adds that many random bytes of extra payload (for transfer tests that need many chunks)."""
    src = workdir / f"{name}-{version}-{scale}-{pad}-{target}-{selftest_scale}-src"
    src.mkdir(parents=True, exist_ok=True)
    linear_model(src / "model.onnx", scale)
    rng = np.random.default_rng(7)
    inputs = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(samples)]
    expected_scale = scale if selftest_scale is None else selftest_scale
    outputs = [{"y": linear_reference(s["x"], expected_scale)} for s in inputs]
    write_vectors(src / "selftest.npz", inputs, outputs)
    files = [
        BundleFile("model.onnx", src / "model.onnx", "model"),
        BundleFile("selftest.npz", src / "selftest.npz", "selftest"),
    ]
    if pad:
        (src / "pad.bin").write_bytes(np.random.default_rng(int(scale * 1000) + pad).bytes(pad))
        files.append(BundleFile("pad.bin", src / "pad.bin"))
    out = src.with_suffix(".epk")
    manifest = write_bundle(
        out,
        files=files,
        signers=[key],
        name=name,
        version=version,
        target=target,
        runtime=RuntimeRequirement(name="onnxruntime", version=">=1.16"),
        model_file="model.onnx",
        inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 3])],
        selftest=SelfTest(vectors="selftest.npz", atol=1e-4, rtol=1e-4, samples=samples),
        execution={"providers": [{"name": "CPUExecutionProvider", "options": {}}]},
    )
    return out, manifest
