"""The OpenVINO backend: the ONNX model directly, the same model as IR, a .tflite, device and precision."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edgepack.errors import InferenceInputError, RuntimeBackendError
from edgepack.manifest import TensorSpec
from edgepack.runtimes import RuntimeOptions, get_backend
from edgepack.runtimes.openvino_backend import Pool, choose_device, compile_config

ov = pytest.importorskip("openvino", reason="install edgepack[agent-openvino] to test the OpenVINO backend")


@pytest.fixture(scope="module")
def ir_path(conv_onnx, tmp_path_factory: pytest.TempPathFactory) -> Path:
    xml = tmp_path_factory.mktemp("ir") / "conv.xml"
    # save_model compresses weights to f16 by default; keep f32 so outputs match the ONNX reference
    ov.save_model(ov.convert_model(str(conv_onnx.path)), str(xml), compress_to_fp16=False)
    return xml


def _load(path: Path, conv_onnx, execution: dict | None = None, **options):
    return get_backend("openvino").load(
        path,
        inputs=conv_onnx.inputs,
        outputs=conv_onnx.outputs,
        execution=execution or {},
        options=RuntimeOptions(**options),
    )


@pytest.mark.parametrize("kind", ["onnx", "ir"])
def test_infer_matches_numpy_reference(kind: str, conv_onnx, ir_path: Path, tmp_path: Path) -> None:
    path = conv_onnx.path if kind == "onnx" else ir_path
    model = _load(path, conv_onnx, threads=1, cache_dir=tmp_path)
    x = np.random.default_rng(3).normal(size=(2, 1, 8, 8)).astype(np.float32)
    out = model.infer({"input": x})
    assert list(out) == ["logits"]
    np.testing.assert_allclose(out["logits"], conv_onnx.weights.reference(x), rtol=1e-5, atol=1e-5)
    info = model.describe()
    assert info["inference_precision"] == "f32"  # pinned, read back from the compiled model
    assert info["device"] == "CPU"
    assert info["threads"] == 1
    model.close()


def test_precision_follows_the_plan(conv_onnx) -> None:
    model = _load(conv_onnx.path, conv_onnx, {"inference_precision": "f32", "device": "CPU"})
    assert model.describe()["inference_precision"] == "f32"
    assert compile_config({}, RuntimeOptions())["INFERENCE_PRECISION_HINT"] == "f32"
    assert compile_config({"inference_precision": "f16"}, RuntimeOptions())["INFERENCE_PRECISION_HINT"] == "f16"


def test_compile_config_threads_and_cache(tmp_path: Path) -> None:
    config = compile_config({}, RuntimeOptions(threads=3, cache_dir=tmp_path))
    assert config["INFERENCE_NUM_THREADS"] == 3
    assert Path(config["CACHE_DIR"]).is_dir()
    assert "INFERENCE_NUM_THREADS" not in compile_config({}, RuntimeOptions())


def test_choose_device_falls_back_to_cpu() -> None:
    assert choose_device("GPU", ["CPU"], RuntimeOptions()) == "CPU"
    assert choose_device("GPU", ["CPU", "GPU.0"], RuntimeOptions()) == "GPU"
    assert choose_device("GPU.0", ["CPU", "GPU.0"], RuntimeOptions()) == "GPU.0"
    assert choose_device("GPU", ["CPU", "GPU"], RuntimeOptions(allow_accelerators=False)) == "CPU"
    assert choose_device("AUTO:GPU,CPU", ["CPU"], RuntimeOptions()) == "AUTO:GPU,CPU"


def test_missing_gpu_runs_on_cpu(conv_onnx) -> None:
    model = _load(conv_onnx.path, conv_onnx, {"device": "NPU"})
    assert model.describe()["device"] == "CPU"


def test_infer_is_thread_safe(conv_onnx, ir_path: Path) -> None:
    model = _load(ir_path, conv_onnx, threads=1)
    rng = np.random.default_rng(11)
    xs = [rng.normal(size=(1 + i % 2, 1, 8, 8)).astype(np.float32) for i in range(40)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda x: model.infer({"input": x})["logits"], xs))
    for x, got in zip(xs, results, strict=True):
        np.testing.assert_allclose(got, conv_onnx.weights.reference(x), rtol=1e-5, atol=1e-5)


def test_pool_lends_each_object_to_one_borrower() -> None:
    made: list[object] = []

    def make() -> object:
        made.append(object())
        return made[-1]

    pool: Pool[object] = Pool(make, limit=2)
    with pool.borrow() as a, pool.borrow() as b:
        assert a is not b
    with pool.borrow() as c:
        assert c in (a, b)
    assert len(made) == 2


def test_invalid_input_is_refused(conv_onnx) -> None:
    model = _load(conv_onnx.path, conv_onnx)
    with pytest.raises(InferenceInputError, match="has dtype int32, expected float32"):
        model.infer({"input": np.zeros((1, 1, 8, 8), np.int32)})


def test_ir_without_weights_and_unknown_suffix(tmp_path: Path, ir_path: Path, conv_onnx) -> None:
    lonely = tmp_path / "lonely.xml"
    lonely.write_bytes(ir_path.read_bytes())
    with pytest.raises(RuntimeBackendError, match=r"needs its weights lonely\.bin"):
        _load(lonely, conv_onnx)
    with pytest.raises(RuntimeBackendError, match=r"not model\.pt"):
        _load(tmp_path / "model.pt", conv_onnx)


def test_tflite_in_nchw_layout(nhwc_add_tflite) -> None:
    spec = TensorSpec(name="image", dtype="float32", shape=[1, 3, 4, 4], layout="NCHW", native_layout="NHWC")
    out_spec = spec.model_copy(update={"name": "shifted"})
    model = get_backend("openvino").load(
        nhwc_add_tflite.path, inputs=[spec], outputs=[out_spec], execution={}, options=RuntimeOptions()
    )
    x = np.random.default_rng(5).random((1, 3, 4, 4), dtype=np.float32)
    expected = x + nhwc_add_tflite.weights["bias"][None, :, None, None]
    np.testing.assert_allclose(model.infer({"image": x})["shifted"], expected, rtol=1e-6)
