"""The one deterministic split and preprocessing of scikit-learn's handwritten digits.

scikit-learn ships 1,797 real 8×8 grey images of handwritten digits (UCI "optdigits" test set), so the
sample model, the tests, the demo and the benchmarks all use real data without any download. This module
is the single place that decides which image belongs to which part:

    test         360 images   held out: never seen in training or compilation
    validation   200 images   the compiler's accuracy check (with labels)
    train       1237 images   training; its first 128 images double as the calibration set

Preprocessing is ``pixel / 16`` as float32 (the raw pixels are 0..16), laid out NCHW as [N, 1, 8, 8];
the exported model records it in its metadata.

Usage (runs in the main venv; numpy and scikit-learn only)::

    python scripts/models/digits_data.py --out DIR     # DIR/calibration.npz, validation.npz, test.npz

Each .npz holds ``input`` of shape [S, 1, 8, 8] float32 (S samples stacked on the batch axis) and, for
validation and test, ``labels`` of shape [S] int64 — the layout ``edgepack compile --calibration`` reads.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 20240607
N_TEST = 360
N_VALIDATION = 200
N_CALIBRATION = 128
INPUT_NAME = "input"
PIXEL_SCALE = 1.0 / 16.0


@dataclass(frozen=True)
class DigitsSplit:
    """Images as float32 [N, 1, 8, 8] in [0, 1] and labels as int64 [N], per part."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_calibration: np.ndarray
    x_validation: np.ndarray
    y_validation: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_split() -> DigitsSplit:
    """Load the digits and split them the same way every time (fixed seed, fixed sizes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) * np.float32(PIXEL_SCALE))[:, None, :, :]
    labels = digits.target.astype(np.int64)
    order = np.random.RandomState(SEED).permutation(len(labels))
    test, validation, train = np.split(order, [N_TEST, N_TEST + N_VALIDATION])
    return DigitsSplit(
        x_train=images[train],
        y_train=labels[train],
        x_calibration=images[train[:N_CALIBRATION]],
        x_validation=images[validation],
        y_validation=labels[validation],
        x_test=images[test],
        y_test=labels[test],
    )


def write_npz(out: Path) -> dict[str, Path]:
    """Write calibration.npz, validation.npz and test.npz under ``out``; return their paths."""
    split = load_split()
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "calibration": out / "calibration.npz",
        "validation": out / "validation.npz",
        "test": out / "test.npz",
    }
    np.savez(paths["calibration"], **{INPUT_NAME: split.x_calibration})
    np.savez(paths["validation"], **{INPUT_NAME: split.x_validation, "labels": split.y_validation})
    np.savez(paths["test"], **{INPUT_NAME: split.x_test, "labels": split.y_test})
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the .npz files into")
    args = parser.parse_args()
    for part, path in write_npz(args.out).items():
        print(f"{part:12s} {path}")


if __name__ == "__main__":
    main()
