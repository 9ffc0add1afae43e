"""The onnxruntime backend on a tiny Conv+Relu+Gemm model built in conftest."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edgepack.errors import InferenceInputError, RuntimeBackendError
from edgepack.runtimes import RuntimeOptions, get_backend
from edgepack.runtimes.onnxruntime_backend import select_providers

pytest.importorskip("onnxruntime", reason="install edgepack[agent-onnx] to test the onnxruntime backend")

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PLAN = [
    {"name": TRT, "options": {"trt_engine_cache_enable": True, "trt_engine_cache_path": "trt/engines",
                              "trt_timing_cache_path": "trt/timing", "trt_fp16_enable": False}},
    {"name": CUDA, "options": {"device_id": 0}},
    {"name": CPU, "options": {}},
]  # fmt: skip


@pytest.fixture
def model(conv_onnx):
    loaded = get_backend("onnxruntime").load(
        conv_onnx.path,
        inputs=conv_onnx.inputs,
        outputs=conv_onnx.outputs,
        execution={"providers": PLAN, "graph_optimization_level": "extended"},
        options=RuntimeOptions(threads=2),
    )
    yield loaded
    loaded.close()


@pytest.mark.parametrize("batch", [1, 3])
def test_infer_matches_numpy_reference(model, conv_onnx, batch: int) -> None:
    x = np.random.default_rng(batch).normal(size=(batch, 1, 8, 8)).astype(np.float32)
    out = model.infer({"input": x})
    assert list(out) == ["logits"]
    assert out["logits"].shape == (batch, 10)
    np.testing.assert_allclose(out["logits"], conv_onnx.weights.reference(x), rtol=1e-5, atol=1e-5)


def test_describe_reports_providers_in_use(model) -> None:
    info = model.describe()
    assert info["runtime"] == "onnxruntime"
    assert info["providers"][-1] == CPU  # TensorRT/CUDA are not in this build: dropped, CPU last
    assert info["threads"] == 2
    assert [s.name for s in model.inputs] == ["input"]
    assert model.inputs[0].layout == "NCHW"


@pytest.mark.parametrize(
    ("feeds", "expected"),
    [
        ({}, "missing input 'input'"),
        ({"input": np.zeros((1, 1, 8, 8), np.float32), "other": np.zeros(1)}, r"unknown input\(s\) \['other'\]"),
        ({"input": np.zeros((1, 1, 8, 8), np.float64)}, "has dtype float64, expected float32"),
        ({"input": np.zeros((1, 8, 8), np.float32)}, r"shape \[1, 8, 8\], expected \[batch, 1, 8, 8\]"),
        ({"input": np.zeros((1, 1, 8, 9), np.float32)}, r"shape \[1, 1, 8, 9\], expected \[batch, 1, 8, 8\]"),
    ],
)
def test_invalid_inputs_are_refused_before_running(model, feeds, expected: str) -> None:
    with pytest.raises(InferenceInputError, match=expected):
        model.infer(feeds)


def test_infer_is_thread_safe(model, conv_onnx) -> None:
    rng = np.random.default_rng(7)
    xs = [rng.normal(size=(1 + i % 3, 1, 8, 8)).astype(np.float32) for i in range(48)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda x: model.infer({"input": x})["logits"], xs))
    for x, got in zip(xs, results, strict=True):
        np.testing.assert_allclose(got, conv_onnx.weights.reference(x), rtol=1e-5, atol=1e-5)


def test_select_providers_keeps_available_ones_with_cpu_last(tmp_path: Path, caplog) -> None:
    plan = [PLAN[2], PLAN[0], PLAN[1]]  # CPU first in the plan still ends up last
    with caplog.at_level(logging.INFO, logger="edgepack.runtimes.onnxruntime_backend"):
        chosen = select_providers(plan, [TRT, CPU], RuntimeOptions(cache_dir=tmp_path))
    assert [name for name, _ in chosen] == [TRT, CPU]
    trt_options = chosen[0][1]
    assert trt_options["trt_engine_cache_path"] == str(tmp_path / "trt" / "engines")
    assert trt_options["trt_timing_cache_path"] == str(tmp_path / "trt" / "timing")
    assert trt_options["trt_engine_cache_enable"] == "1"
    assert trt_options["trt_fp16_enable"] == "0"
    assert (tmp_path / "trt" / "engines").is_dir()
    assert CUDA in caplog.text


def test_select_providers_without_accelerators_or_plan() -> None:
    assert select_providers(PLAN, [TRT, CUDA, CPU], RuntimeOptions(allow_accelerators=False)) == [(CPU, {})]
    assert select_providers(None, [CPU], RuntimeOptions()) == [(CPU, {})]
    assert select_providers([CUDA, CPU], [CUDA, CPU], RuntimeOptions()) == [(CUDA, {}), (CPU, {})]


@pytest.mark.parametrize("path", ["/var/lib/trt", "../outside", "a/../../b"])
def test_cache_paths_may_not_leave_the_cache_dir(tmp_path: Path, path: str) -> None:
    plan = [{"name": TRT, "options": {"trt_engine_cache_path": path}}]
    with pytest.raises(RuntimeBackendError, match="must be a relative path inside"):
        select_providers(plan, [TRT, CPU], RuntimeOptions(cache_dir=tmp_path))


def test_bad_plan_entries_are_refused() -> None:
    with pytest.raises(RuntimeBackendError, match="must be a provider name"):
        select_providers([{"options": {}}], [CPU], RuntimeOptions())


def test_unknown_optimization_level_is_refused(conv_onnx) -> None:
    with pytest.raises(RuntimeBackendError, match="graph_optimization_level 'fastest'"):
        get_backend("onnxruntime").load(
            conv_onnx.path,
            inputs=[],
            outputs=[],
            execution={"graph_optimization_level": "fastest"},
            options=RuntimeOptions(),
        )


def test_model_specs_are_used_when_the_manifest_gives_none(conv_onnx) -> None:
    loaded = get_backend("onnxruntime").load(conv_onnx.path)  # no specs, plan or options: the model's own
    assert [(s.name, s.dtype, s.shape) for s in loaded.inputs] == [("input", "float32", ["batch", 1, 8, 8])]
    assert [(s.name, s.shape) for s in loaded.outputs] == [("logits", ["batch", 10])]


def test_manifest_that_does_not_fit_the_model_is_refused(conv_onnx) -> None:
    wrong = [conv_onnx.inputs[0].model_copy(update={"name": "image"})]
    with pytest.raises(RuntimeBackendError, match=r"not in the model: \['image'\]"):
        get_backend("onnxruntime").load(
            conv_onnx.path, inputs=wrong, outputs=conv_onnx.outputs, execution={}, options=RuntimeOptions()
        )


def test_unloadable_file_and_closed_model(tmp_path: Path, model) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(RuntimeBackendError, match=r"onnxruntime cannot load junk\.onnx"):
        get_backend("onnxruntime").load(junk, inputs=[], outputs=[], execution={}, options=RuntimeOptions())
    model.close()
    with pytest.raises(RuntimeBackendError, match="closed"):
        model.infer({"input": np.zeros((1, 1, 8, 8), np.float32)})


def test_tensorrt_cache_paths_are_keyed_by_this_device(tmp_path, monkeypatch):
    from edgepack.runtimes import onnxruntime_backend as backend
    from edgepack.runtimes.base import RuntimeOptions

    monkeypatch.setattr(backend, "_tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(backend, "_gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    plan = [
        {
            "name": "TensorrtExecutionProvider",
            "options": {"trt_engine_cache_path": "tensorrt/engines/abc/{trt_version}/{gpu}"},
        }
    ]
    (name, options), _cpu = backend.select_providers(
        plan, ["TensorrtExecutionProvider", "CPUExecutionProvider"], RuntimeOptions(cache_dir=tmp_path)
    )
    assert name == "TensorrtExecutionProvider"
    assert options["trt_engine_cache_path"] == str(tmp_path / "tensorrt/engines/abc/10.3.0/NVIDIA-H100-80GB-HBM3")
