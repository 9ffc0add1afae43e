"""Outputs of mixed scales are judged per slice: a YOLOv8-style head whose int8 score slice is destroyed
fails the bar (the whole-tensor cosine says 0.99999), and the int8 search keeps its concat in float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgepack.bundle import verify_bundle
from edgepack.cli import app
from edgepack.compiler.compare import compare_outputs
from edgepack.compiler.output_slices import find_slices, parse_output_slices
from edgepack.compiler.pipeline import CompileRequest, compile_model
from edgepack.errors import ConfigError
from edgepack.manifest import TensorSpec

from .conftest import Signing
from .detector_models import blob_images, text_detector, yolo_head

OUT = TensorSpec(name="output0", dtype="float32", shape=[1, 12, 64])


def _detections(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        boxes = rng.uniform(0, 640, (1, 4, 64))
        scores = rng.beta(0.3, 6.0, (1, 8, 64))
        samples.append({"output0": np.concatenate([boxes, scores], axis=1).astype(np.float32)})
    return samples


def test_scores_rounded_away_fail_although_the_whole_tensor_cosine_passes() -> None:
    reference = _detections(16)
    broken = [{"output0": np.concatenate([r["output0"][:, :4], 0 * r["output0"][:, 4:]], axis=1)} for r in reference]
    report = compare_outputs(reference, broken, [OUT])
    out = report.outputs[0]
    assert out.cosine_mean > 0.999  # what the gate used to judge: it passed the broken detector
    assert out.slices_from == "value ranges"
    assert [(s.start, s.end) for s in out.slices] == [(0, 4), (4, 12)]
    assert out.slices[1].cosine_mean == 0.0
    assert not report.passed
    assert any("output0[axis 1, 4:12]: cosine similarity 0.0000" in f for f in report.failures), report.failures
    assert report.failing_slices() == ["output0"]
    assert report.to_dict()["outputs"]["output0"]["slices"][1]["cosine_mean"] == 0.0
    # the same output judged whole (no slices) passes: that is the defect the slices fix
    assert compare_outputs(reference, broken, [OUT], slices={}).passed
    # a compiled model that keeps the scores passes
    close = [{"output0": r["output0"] * np.float32(1.0001)} for r in reference]
    assert compare_outputs(reference, close, [OUT]).passed


def test_one_scale_is_judged_whole() -> None:
    rng = np.random.default_rng(3)
    reference = [{"output0": rng.normal(size=(1, 12, 64)).astype(np.float32)} for _ in range(8)]
    assert find_slices(reference, [OUT]) == {}


def test_a_heat_map_is_not_cut_into_slices(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = text_detector(tmp_path / "det.onnx", size=64, width=8)
    session = ort.InferenceSession(str(model))
    images = blob_images(8, 64)
    reference = [{"maps": session.run(None, {"x": images[i : i + 1]})[0]} for i in range(8)]
    assert find_slices(reference, [TensorSpec(name="maps", dtype="float32", shape=[1, 1, 64, 64])]) == {}


def test_output_slices_flag_parses_and_checks() -> None:
    assert parse_output_slices(["output0:1:0-4,4-12"]) == {"output0": (1, [(0, 4), (4, 12)])}
    assert parse_output_slices(["PartitionedCall:0:2:4-12,0-4"]) == {"PartitionedCall:0": (2, [(0, 4), (4, 12)])}
    for bad in ("output0", "output0:1", "output0:x:0-4", "output0:1:4-2", "output0:1:0-4,"):
        with pytest.raises(ConfigError, match="--output-slices"):
            parse_output_slices([bad])
    reference = _detections(2)
    with pytest.raises(ConfigError, match="past axis 1's size 12"):
        find_slices(reference, [OUT], overrides={"output0": (1, [(0, 4), (4, 13)])})
    with pytest.raises(ConfigError, match="does not output"):
        find_slices(reference, [OUT], overrides={"boxes": (1, [(0, 4)])})


@pytest.fixture(scope="module")
def yolo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("yolo")
    calibration = folder / "calibration.npz"
    np.savez(calibration, images=blob_images(32, 64))
    return yolo_head(folder / "yolo.onnx"), calibration


def test_the_int8_search_keeps_the_head_concat_in_float(
    yolo: tuple[Path, Path], signing: Signing, tmp_path: Path
) -> None:
    model, calibration = yolo
    request = CompileRequest(
        model=model, target="x86", calibration=calibration, keys=[signing.key_file], output=tmp_path / "yolo.epk"
    )
    result = compile_model(request)
    assert result.precision == "int8" and result.accuracy.passed
    tries = result.attempts[0]["tries"]
    assert tries[0]["passed"] is False and "[4:12] cos 0.0" in tries[0]["summary"], tries[0]
    assert "output0: max|d|" in tries[0]["summary"] and ", cos 1.0000," in tries[0]["summary"]
    kept = result.kept_in_float[0]
    assert "head_concat" in kept.nodes and "cls_sigmoid" in kept.nodes
    assert "joins slices of different scales on axis 1" in kept.reason
    out = result.accuracy.outputs[0]
    assert out.slices_from == "Concat node 'head_concat'"
    assert all(s.cosine_mean >= 0.99 for s in out.slices)
    manifest = verify_bundle(result.output, signing.trust)
    assert manifest.accuracy["outputs"]["output0"]["slices"][1]["label"] == "output0[axis 1, 4:12]"
    assert manifest.quantization["kept_in_float"][0]["nodes"][0] == "head_concat"


def test_the_cli_takes_output_slices(yolo: tuple[Path, Path], signing: Signing, tmp_path: Path) -> None:
    model, calibration = yolo
    out = tmp_path / "yolo.epk"
    args = ["compile", str(model), "-t", "x86", "-p", "fp32", "-c", str(calibration), "-k", str(signing.key_file)]
    result = CliRunner().invoke(app, [*args, "-o", str(out), "--output-slices", "output0:1:0-2,2-4,4-12"])
    assert result.exit_code == 0, (result.output, result.exception)
    manifest = verify_bundle(out, signing.trust)
    accuracy = manifest.accuracy["outputs"]["output0"]
    assert accuracy["slices_from"] == "--output-slices" and len(accuracy["slices"]) == 3
    bad = CliRunner().invoke(app, [*args, "-o", str(out), "--output-slices", "output0:1:0-99"])
    assert bad.exit_code == 2 and "past axis 1's size 12" in " ".join(bad.output.split())
