"""edgepack.datasets: the one way data comes in, and exact messages when it does not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepack.datasets import Samples, load_samples
from edgepack.errors import DataError
from edgepack.manifest import TensorSpec

IMAGE = TensorSpec(name="image", dtype="float32", shape=["batch", 3, 4, 4])
FIXED = TensorSpec(name="image", dtype="float32", shape=[1, 3, 4, 4])
STATE = TensorSpec(name="state", dtype="float32", shape=[2, 1, 8])


def test_npz_stacked_on_the_batch_axis(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, image=np.arange(5 * 48, dtype=np.float32).reshape(5, 3, 4, 4), labels=np.arange(5))
    samples = load_samples(path, [FIXED])
    assert len(samples) == 5 and samples.rows == 5
    assert samples.feeds[2]["image"].shape == (1, 3, 4, 4)
    assert samples.feeds[2]["image"][0, 0, 0, 0] == 2 * 48
    assert samples.labels is not None and list(samples.labels) == [0, 1, 2, 3, 4]
    assert samples.stacked("image").shape == (5, 1, 3, 4, 4)


def test_sample_axis_in_front_for_an_input_without_batch(tmp_path: Path) -> None:
    path = tmp_path / "rnn.npz"
    np.savez(path, state=np.zeros((7, 2, 1, 8), np.float32))
    samples = load_samples(path, [STATE])
    assert len(samples) == 7 and samples.feeds[0]["state"].shape == (2, 1, 8)


def test_fixed_batch_bigger_than_one_takes_rows_n_at_a_time() -> None:
    spec = TensorSpec(name="x", dtype="float32", shape=[4, 2])
    samples = load_samples({"x": np.zeros((12, 2), np.float32)}, [spec])
    assert len(samples) == 3 and samples.feeds[0]["x"].shape == (4, 2)
    with pytest.raises(DataError, match="10 rows do not divide into samples of the fixed batch size 4"):
        load_samples({"x": np.zeros((10, 2), np.float32)}, [spec])


def test_folder_of_files_and_npy(tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "a.npz", image=np.zeros((2, 3, 4, 4), np.float32))
    np.save(folder / "b.npy", np.ones((3, 3, 4, 4), np.float32))
    samples = load_samples(folder, [IMAGE], limit=4)
    assert len(samples) == 4
    assert samples.feeds[3]["image"].max() == 1.0


def test_iterable_of_dicts_and_float64_is_cast() -> None:
    def gen():
        for i in range(3):
            yield {"image": np.full((1, 3, 4, 4), i, dtype=np.float64), "labels": np.array([i])}

    samples = load_samples(gen(), [IMAGE])
    assert len(samples) == 3 and samples.feeds[1]["image"].dtype == np.float32
    assert samples.labels is not None and list(samples.labels) == [0, 1, 2]
    again = load_samples(samples, [IMAGE])
    assert again is samples


@pytest.mark.parametrize(
    ("arrays", "fragments"),
    [
        (
            {"image": np.zeros((5, 4, 4), np.float32)},
            ["input 'image'", "float32 [batch, 3, 4, 4]", "found float32 [5, 4, 4]"],
        ),
        ({"image": np.zeros((5, 3, 4, 4), np.int32)}, ["expected dtype float32, found int32"]),
        ({"picture": np.zeros((5, 3, 4, 4), np.float32)}, ["lacks input(s) 'image'", "found picture"]),
        (
            {"image": np.zeros((5, 3, 4, 4), np.float32), "mask": np.zeros(5)},
            ["'mask'", "not model inputs"],
        ),
        ({"image": np.zeros((5, 3, 4, 4), np.float32), "labels": np.zeros(4)}, ["'labels' has 4 entries", "5 rows"]),
    ],
)
def test_what_does_not_fit_is_named(tmp_path: Path, arrays: dict, fragments: list[str]) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as info:
        load_samples(path, [IMAGE], what="calibration data")
    message = str(info.value)
    assert "calibration data" in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_inputs_with_different_sample_counts() -> None:
    specs = [IMAGE, TensorSpec(name="scale", dtype="float32", shape=["batch", 1])]
    with pytest.raises(DataError, match="different numbers of samples"):
        load_samples({"image": np.zeros((4, 3, 4, 4), np.float32), "scale": np.zeros((3, 1), np.float32)}, specs)


def test_unreadable_and_missing_sources(tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_text("not numpy")
    with pytest.raises(DataError, match="not a readable"):
        load_samples(tmp_path / "x.npz", [IMAGE])
    with pytest.raises(DataError, match="does not exist"):
        load_samples(tmp_path / "nope.npz", [IMAGE])
    with pytest.raises(DataError, match="holds no"):
        load_samples(Samples(feeds=[], labels=None, origin="empty"), [IMAGE])
    with pytest.raises(DataError, match="not a dict"):
        load_samples([np.zeros(3)], [IMAGE])
