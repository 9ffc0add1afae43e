"""Self-test vectors: writing, reading, replaying, and the errors that name what differs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from edgepack.errors import SelfTestError
from edgepack.manifest import TensorSpec
from edgepack.runtimes import LoadedModel, RuntimeOptions, get_backend
from edgepack.runtimes.tensors import SignatureAdapter
from edgepack.selftest import compare, evaluate_selftest, read_vectors, run_selftest, write_vectors


class Doubler(LoadedModel):
    """out = 2 * x, a stand-in model for the runner's own logic."""

    def __init__(self) -> None:
        self.inputs = [TensorSpec(name="x", dtype="float32", shape=[1, 3])]
        self.outputs = [TensorSpec(name="out.double", dtype="float32", shape=[1, 3])]

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"out.double": SignatureAdapter(self.inputs, self.outputs).validate(inputs)["x"] * 2}

    def close(self) -> None:
        pass


def _samples(n: int = 4) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(0)
    xs = [{"x": rng.random((1, 3), dtype=np.float32)} for _ in range(n)]
    return xs, [{"out.double": s["x"] * 2} for s in xs]


def test_vectors_round_trip(tmp_path: Path) -> None:
    inputs, outputs = _samples()
    path = tmp_path / "selftest.npz"
    write_vectors(path, inputs, outputs)
    with np.load(path) as npz:
        assert sorted(npz.files) == ["input.x", "output.out.double"]
        assert npz["input.x"].shape == (4, 1, 3)
    got_in, got_out = read_vectors(path)
    assert len(got_in) == len(got_out) == 4
    np.testing.assert_array_equal(got_in[2]["x"], inputs[2]["x"])
    np.testing.assert_array_equal(got_out[3]["out.double"], outputs[3]["out.double"])
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_selftest_passes_within_tolerance(tmp_path: Path) -> None:
    inputs, outputs = _samples()
    outputs[1]["out.double"] = outputs[1]["out.double"] + 1e-6
    write_vectors(tmp_path / "v.npz", inputs, outputs)
    report = run_selftest(Doubler(), tmp_path / "v.npz", atol=1e-5, rtol=1e-5)
    assert report.passed and report.samples == 4
    assert 0 < report.max_abs_diff["out.double"] < 1e-5


def test_altered_vector_fails_naming_sample_output_and_difference(tmp_path: Path) -> None:
    inputs, outputs = _samples()
    outputs[2]["out.double"] = outputs[2]["out.double"].copy()
    outputs[2]["out.double"][0, 1] += 0.5
    write_vectors(tmp_path / "v.npz", inputs, outputs)
    with pytest.raises(
        SelfTestError, match=r"sample 2, output 'out\.double': \|diff\| 0\.5 exceeds the allowed 0\.0001"
    ):
        run_selftest(Doubler(), tmp_path / "v.npz", atol=1e-4, rtol=0)
    report = evaluate_selftest(Doubler(), tmp_path / "v.npz", atol=1e-4, rtol=0)
    assert not report.passed
    assert report.max_abs_diff["out.double"] == pytest.approx(0.5)


def test_compare_semantics() -> None:
    nan = np.float32("nan")
    assert compare(0, "o", np.array([nan, 1.0]), np.array([nan, 1.0]), 0, 0)[1] is None
    assert compare(0, "o", np.array([0.0, 1.0]), np.array([nan, 1.0]), 1, 1)[1] is not None
    assert compare(0, "o", np.array([nan]), np.array([0.0]), 1, 1)[1] is not None
    assert compare(0, "o", np.array([np.inf]), np.array([np.inf]), 0, 0)[1] is None
    assert compare(0, "o", np.array([-np.inf]), np.array([np.inf]), 1, 1)[1] is not None
    assert compare(0, "o", np.array([101.0]), np.array([100.0]), 0, 0.01)[1] is None  # rtol * |expected|
    assert compare(0, "o", np.array([3, 4]), np.array([3, 5]), 0, 0)[1] is not None  # integers: exact
    assert compare(0, "o", np.array([True]), np.array([True]), 0, 0)[1] is None
    shape = compare(1, "o", np.zeros((1, 2)), np.zeros((2, 1)), 1, 1)[1]
    assert shape is not None and "shape [1, 2] differs from the expected [2, 1]" in str(shape)
    text = compare(0, "o", np.array(["a", "b"]), np.array(["a", "c"]), 0, 0)[1]
    assert text is not None and "1 of 2 values differ" in str(text)


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"input.x": np.zeros((2, 3))}, "at least one of each"),
        ({"input.x": np.zeros((2, 3)), "output.y": np.zeros((2, 3)), "junk": np.zeros(2)}, "found"),
        ({"input.x": np.zeros((2, 3)), "output.y": np.zeros((3, 3))}, "same number of samples"),
        ({"input.x": np.zeros((0, 3)), "output.y": np.zeros((0, 3))}, "same number of samples"),
        ({"input.x": np.zeros(()), "output.y": np.zeros(())}, "same number of samples"),
        ({"input.x": np.array([[{"a": 1}]], dtype=object), "output.y": np.zeros((1, 1))}, "cannot read"),
    ],
)
def test_malformed_vectors_are_refused(tmp_path: Path, arrays: dict, expected: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # allow_pickle defaults to True here: the reader must still refuse objects
    with pytest.raises(SelfTestError, match=expected):
        read_vectors(path)


def test_not_an_npz_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(SelfTestError, match="single array"):
        read_vectors(tmp_path / "single.npy")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(SelfTestError, match=r"cannot read self-test vectors text\.npz"):
        read_vectors(tmp_path / "text.npz")


def test_vectors_for_an_output_the_model_lacks(tmp_path: Path) -> None:
    inputs, _ = _samples(1)
    write_vectors(tmp_path / "v.npz", inputs, [{"probabilities": np.zeros((1, 3), np.float32)}])
    with pytest.raises(SelfTestError, match=r"outputs \['probabilities'\] that the model does not produce"):
        run_selftest(Doubler(), tmp_path / "v.npz", atol=1, rtol=1)


def test_vectors_that_do_not_fit_the_inputs(tmp_path: Path) -> None:
    _, outputs = _samples(1)
    write_vectors(tmp_path / "v.npz", [{"x": np.zeros((1, 3), np.float64)}], outputs)
    with pytest.raises(SelfTestError, match="sample 0 does not fit the model's inputs"):
        run_selftest(Doubler(), tmp_path / "v.npz", atol=1, rtol=1)


def test_write_vectors_refuses_inconsistent_samples(tmp_path: Path) -> None:
    inputs, outputs = _samples(2)
    with pytest.raises(ValueError, match="one outputs dict per inputs dict"):
        write_vectors(tmp_path / "v.npz", inputs, outputs[:1])
    with pytest.raises(ValueError, match=r"sample 1 has inputs \['y'\], sample 0 has \['x'\]"):
        write_vectors(tmp_path / "v.npz", [inputs[0], {"y": inputs[1]["x"]}], outputs)
    with pytest.raises(ValueError, match="same shape and dtype"):
        write_vectors(tmp_path / "v.npz", [inputs[0], {"x": np.zeros((2, 3), np.float32)}], outputs)
    assert not list(tmp_path.iterdir())


def test_selftest_on_a_real_runtime(tmp_path: Path, conv_onnx) -> None:
    pytest.importorskip("onnxruntime")
    model = get_backend("onnxruntime").load(
        conv_onnx.path, inputs=conv_onnx.inputs, outputs=conv_onnx.outputs, execution={}, options=RuntimeOptions()
    )
    rng = np.random.default_rng(9)
    inputs = [{"input": rng.normal(size=(1, 1, 8, 8)).astype(np.float32)} for _ in range(3)]
    outputs = [{"logits": conv_onnx.weights.reference(s["input"]).astype(np.float32)} for s in inputs]
    write_vectors(tmp_path / "v.npz", inputs, outputs)
    report = run_selftest(model, tmp_path / "v.npz", atol=1e-4, rtol=1e-4)
    assert report.samples == 3 and report.max_abs_diff["logits"] < 1e-4
