"""A corpus of broken compiler inputs, each with the error a user must get instead of a traceback.

Every case writes its model (and, where the case is about data or flags, its calibration data and extra
command-line arguments) into a folder and names what the message must say. ``test_broken_inputs.py`` runs
each through ``edgepack compile`` in a subprocess and asserts exit code 2, a short message and no traceback.
Built with ``onnx.helper`` and numpy only, from the sample model or from tiny graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
SAMPLE_MODEL = REPO / "models" / "digits_cnn.onnx"


@dataclass
class Case:
    """One broken input: the model file, the calibration data, extra CLI arguments, what the error says."""

    name: str
    model: Path
    calibration: Path
    fragments: tuple[str, ...]
    args: list[str] = field(default_factory=list)


def digits_calibration(folder: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(0)
    path = folder / "calibration.npz"
    np.savez(path, input=rng.random((n, 1, 8, 8), dtype=np.float32))
    return path


def ocr_classifier(path: Path, dims: list[int | str] | None = None) -> Path:
    """A PaddleOCR-style direction classifier: input ``x`` ``[-1, 3, '?', '?']`` (two dims share the name).

    Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Softmax, random weights (the shape is the point).
    """
    rng = np.random.default_rng(1)
    dims = dims if dims is not None else [-1, 3, "?", "?"]
    shape = list(dims)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape[0], 2])
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b0"),
        numpy_helper.from_array(rng.normal(0, 0.3, (2, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(2, np.float32), "b1"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("GlobalAveragePool", ["r0"], ["p0"], name="gap0"),
        helper.make_node("Flatten", ["p0"], ["f0"], name="flatten0"),
        helper.make_node("Gemm", ["f0", "w1", "b1"], ["g0"], name="fc0", transB=1),
        helper.make_node("Softmax", ["g0"], ["y"], name="softmax0", axis=1),
    ]
    graph = helper.make_graph(nodes, "ocr_cls", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _sample(edit: Callable[[onnx.ModelProto], None], path: Path) -> Path:
    proto = onnx.load(str(SAMPLE_MODEL))
    edit(proto)
    onnx.save(proto, str(path))
    return path


def _drop_initializer(proto: onnx.ModelProto) -> None:
    kept = [t for t in proto.graph.initializer if t.name != "onnx::Conv_42"]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)


def _nan_weights(proto: onnx.ModelProto) -> None:
    for tensor in proto.graph.initializer:
        if tensor.name == "head.1.weight":
            array = numpy_helper.to_array(tensor).copy()
            array[3, :5] = np.nan
            array[4, 0] = np.inf
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


def _opset(version: int) -> Callable[[onnx.ModelProto], None]:
    def edit(proto: onnx.ModelProto) -> None:
        proto.opset_import[0].version = version

    return edit


def _zero_dim(proto: onnx.ModelProto) -> None:
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 0


def build(folder: Path) -> list[Case]:
    """Write every case under ``folder``; returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    calibration = digits_calibration(folder)
    data = SAMPLE_MODEL.read_bytes()
    truncated = folder / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    noise = folder / "random.onnx"
    noise.write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    wrong_shape = folder / "wrong_shape.npz"
    np.savez(wrong_shape, input=np.zeros((4, 8, 8, 1), np.float32))
    wrong_dtype = folder / "wrong_dtype.npz"
    np.savez(wrong_dtype, input=np.zeros((4, 1, 8, 8), np.uint8))
    ocr = ocr_classifier(folder / "ocr_cls.onnx")
    return [
        Case("truncated file", truncated, calibration, ("truncated.onnx", "not an ONNX")),
        Case("random bytes", noise, calibration, ("random.onnx", "not an ONNX")),
        Case(
            "missing initializer",
            _sample(_drop_initializer, folder / "missing_init.onnx"),
            calibration,
            ("onnx::Conv_42",),
        ),
        Case("opset too old", _sample(_opset(3), folder / "opset3.onnx"), calibration, ("opset 3",)),
        Case("opset from the future", _sample(_opset(99), folder / "opset99.onnx"), calibration, ("opset 99",)),
        Case("dimension of 0", _sample(_zero_dim, folder / "zero_dim.onnx"), calibration, ("input 'input'", "0")),
        Case(
            "--input-shape of the wrong rank",
            SAMPLE_MODEL,
            calibration,
            ("--input-shape", "rank 4"),
            ["--input-shape", "input=1,8,8"],
        ),
        Case(
            "non-finite weights",
            _sample(_nan_weights, folder / "nan_weights.onnx"),
            calibration,
            ("head.1.weight", "NaN"),
        ),
        Case("calibration of the wrong shape", SAMPLE_MODEL, wrong_shape, ("calibration data", "input 'input'")),
        Case("calibration of the wrong dtype", SAMPLE_MODEL, wrong_dtype, ("expected dtype float32", "uint8")),
        Case(
            "--input-shape against a fixed dimension of the shared-name model",
            ocr,
            calibration,
            ("dimension 1", "fixed at 3"),
            ["--input-shape", "x=1,4,48,192"],
        ),
    ]
