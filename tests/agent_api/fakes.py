"""Served models made of numpy functions, for the local API tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgepack.errors import InferenceInputError
from edgepack.manifest import TensorSpec

RNG = np.random.default_rng(7)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)


@dataclass
class FunctionModel:
    """A ServedModel whose inference is a plain function of the input dict."""

    name: str
    version: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    platform: str = "numpy"

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.fn(inputs)


def linear(x: np.ndarray) -> dict[str, np.ndarray]:
    y = x @ W + B
    return {"y": y, "label": np.argmax(y, axis=1).astype(np.int64)}


def _bytes_echo(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    text = inputs["text"]
    upper = np.array([t.upper() for t in text.ravel()], dtype=object).reshape(text.shape)
    lengths = np.array([len(t) for t in text.ravel()], dtype=np.int32).reshape(text.shape)
    return {"upper": upper, "length": lengths}


def _slow(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    time.sleep(float(inputs["seconds"][0]))
    return {"done": np.array([True])}


def _boom(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    raise RuntimeError("the accelerator fell over")


def _guarded(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    raise InferenceInputError("input 'x': values must lie in [0, 1]")


def _spec(name: str, dtype: str, shape: list[int | str]) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=shape)


def make_models() -> list[FunctionModel]:
    x = [_spec("x", "float32", ["batch", 4])]
    linear_out = [_spec("y", "float32", ["batch", 3]), _spec("label", "int64", ["batch"])]
    return [
        FunctionModel("linear", "0.9.0", x, linear_out, lambda i: linear(i["x"])),
        FunctionModel("linear", "1.0.0", x, linear_out, lambda i: linear(i["x"]), platform="onnxruntime_onnx"),
        FunctionModel(
            "half",
            "1.0.0",
            [_spec("a", "float16", ["n", 8]), _spec("b", "float16", ["n", 8])],
            [_spec("sum", "float16", ["n", 8])],
            lambda i: {"sum": i["a"] + i["b"]},
        ),
        FunctionModel(
            "bytes_echo",
            "1.0.0",
            [_spec("text", "string", ["n"])],
            [_spec("upper", "string", ["n"]), _spec("length", "int32", ["n"])],
            _bytes_echo,
        ),
        FunctionModel("slow", "1.0.0", [_spec("seconds", "float32", [1])], [_spec("done", "bool", [1])], _slow),
        FunctionModel("boom", "1.0.0", x, linear_out, _boom),
        FunctionModel("guarded", "1.0.0", x, linear_out, _guarded),
        FunctionModel("warming", "1.0.0", x, linear_out, lambda i: linear(i["x"])),
    ]
