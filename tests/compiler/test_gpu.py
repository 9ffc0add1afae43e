"""On a machine with an NVIDIA GPU: the GPU bundles run with onnxruntime-gpu's CUDA provider (and
TensorRT where installed) and pass their self-test. Skipped, with the reason, everywhere else."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.bundle import extract_bundle
from edgepack.runtimes.base import RuntimeOptions, get_backend
from edgepack.selftest import run_selftest

from .conftest import Compile, Signing

pytestmark = pytest.mark.gpu


def _gpu_providers() -> list[str]:
    import onnxruntime as ort

    return [p for p in ort.get_available_providers() if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]


@pytest.mark.parametrize(("target", "precision"), [("nvidia-gpu", "auto"), ("jetson", "auto"), ("nvidia-gpu", "int8")])
def test_gpu_bundle_runs_on_cuda_and_passes_selftest(
    compile_sample: Compile, signing: Signing, tmp_path: Path, target: str, precision: str
) -> None:
    providers = _gpu_providers()
    if "CUDAExecutionProvider" not in providers:
        import onnxruntime as ort

        pytest.skip(
            f"no CUDAExecutionProvider in this onnxruntime ({ort.__version__}: {ort.get_available_providers()}); "
            "install onnxruntime-gpu on a machine with an NVIDIA GPU to run this test"
        )
    result = compile_sample(target, precision)
    manifest = extract_bundle(result.output, tmp_path / "b", signing.trust)
    assert manifest.selftest is not None
    model = get_backend("onnxruntime").load(
        tmp_path / "b" / manifest.model_file,
        inputs=manifest.inputs,
        outputs=manifest.outputs,
        execution=manifest.execution,
        options=RuntimeOptions(cache_dir=tmp_path / "cache"),
    )
    try:
        used = model.describe().get("providers", [])
        print(f"{target}/{result.precision}: providers in use {used}")
        assert used[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        report = run_selftest(
            model, tmp_path / "b" / manifest.selftest.vectors, manifest.selftest.atol, manifest.selftest.rtol
        )
        print(f"{target}/{result.precision}: self-test max |diff| {report.max_abs_diff}")
    finally:
        model.close()
