"""Fixtures of the compiler tests: the real digits data, a signing key and its trust store, and compiled
bundles of the sample model built once per session and shared by the tests that inspect them."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest

from edgepack.compiler.pipeline import CompileRequest, CompileResult, compile_model
from edgepack.keys import SigningKey
from edgepack.trust import TrustStore

REPO = Path(__file__).resolve().parents[2]
SAMPLE_MODEL = REPO / "models" / "digits_cnn.onnx"

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxslim")


def _digits_module() -> ModuleType:
    path = REPO / "scripts" / "models" / "digits_data.py"
    spec = importlib.util.spec_from_file_location("digits_data", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Digits:
    calibration: Path
    validation: Path
    test: Path


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    """calibration.npz, validation.npz (labels) and test.npz (labels) from scikit-learn's digits."""
    paths = _digits_module().write_npz(tmp_path_factory.mktemp("digits"))
    return Digits(paths["calibration"], paths["validation"], paths["test"])


@dataclass(frozen=True)
class Signing:
    key_file: Path
    trust: TrustStore


@pytest.fixture(scope="session")
def signing(tmp_path_factory: pytest.TempPathFactory) -> Signing:
    root = tmp_path_factory.mktemp("signing")
    SigningKey.generate().save(root / "keys", "compiler")
    store = TrustStore.init(root / "trust", [root / "keys" / "compiler.pub"], threshold=1)
    return Signing(root / "keys" / "compiler.key", store)


Compile = Callable[..., CompileResult]


@pytest.fixture(scope="session")
def compile_sample(tmp_path_factory: pytest.TempPathFactory, digits: Digits, signing: Signing) -> Compile:
    """compile_sample(target, precision="auto", **request fields) -> CompileResult, cached per arguments."""
    cache: dict[tuple, CompileResult] = {}
    out_dir = tmp_path_factory.mktemp("bundles")

    def run(target: str, precision: str = "auto", **kwargs: object) -> CompileResult:
        key = (target, precision, tuple(sorted(kwargs.items())))
        if key not in cache:
            request = CompileRequest(
                model=kwargs.pop("model", SAMPLE_MODEL),  # type: ignore[arg-type]
                target=target,
                precision=precision,
                calibration=digits.calibration,
                validation=digits.validation,
                keys=[signing.key_file],
                output=out_dir / f"{target}-{precision}-{len(cache)}.epk",
                **kwargs,  # type: ignore[arg-type]
            )
            cache[key] = compile_model(request)
        return cache[key]

    return run


def top1(model_path: Path, x: np.ndarray, execution: dict | None = None, input_name: str = "input") -> np.ndarray:
    """Class predictions on this host's CPU, one sample at a time, run as a device runs them: the
    onnxruntime backend with the bundle's execution plan."""
    from edgepack.compiler.load import tensor_specs
    from edgepack.runtimes.base import RuntimeOptions, get_backend

    proto = onnx.load(str(model_path))
    model = get_backend("onnxruntime").load(
        model_path,
        inputs=tensor_specs(proto, "input"),
        outputs=tensor_specs(proto, "output"),
        execution=execution or {},
        options=RuntimeOptions(threads=1),
    )
    try:
        return np.concatenate(
            [next(iter(model.infer({input_name: x[i : i + 1]}).values())).argmax(-1) for i in range(len(x))]
        )
    finally:
        model.close()


def outlier_model(path: Path, factor: float = 1000.0) -> Path:
    """The sample model with one hidden channel scaled by ``factor`` and its reader scaled back.

    Float outputs are unchanged (ReLU is positively homogeneous), but the hidden tensor now has a huge
    outlier channel: one per-tensor int8 scale crushes the other 127 channels to zero, and plain int8
    loses the classifier. The activation-outlier case the accuracy-aware search exists for.
    """
    proto = onnx.load(str(SAMPLE_MODEL))
    gemms = [n for n in proto.graph.node if n.op_type == "Gemm"]
    weights = {t.name: t for t in proto.graph.initializer}

    def scale(name: str, fn: Callable[[np.ndarray], None]) -> None:
        array = onnx.numpy_helper.to_array(weights[name]).copy()
        fn(array)
        weights[name].CopyFrom(onnx.numpy_helper.from_array(array, name))

    first, second = gemms[0], gemms[-1]
    scale(first.input[1], lambda w: w.__setitem__(0, w[0] * factor))  # transB=1: rows are outputs
    scale(first.input[2], lambda b: b.__setitem__(0, b[0] * factor))
    scale(second.input[1], lambda w: w.__setitem__((slice(None), 0), w[:, 0] / factor))
    onnx.save(proto, str(path))
    return path
