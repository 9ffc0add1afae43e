"""Train the sample model — a small CNN on scikit-learn's real handwritten digits — and export it to ONNX.

The result, ``models/digits_cnn.onnx``, is committed: it is the demo's default model and the compiler
tests' end-to-end subject. This script needs PyTorch, which the main install does not, so it runs in its
own venv:

    python3 -m venv /work/venvs/train
    /work/venvs/train/bin/pip install torch==2.13.0 onnx onnxscript scikit-learn numpy
    /work/venvs/train/bin/python scripts/models/train_digits_cnn.py            # -> models/digits_cnn.onnx

The split and preprocessing come from ``digits_data.py`` beside this file (fixed seed), so the
calibration/validation/test files it writes match what the model was trained and evaluated on.

The model: input ``input`` float32 [batch, 1, 8, 8] (pixel / 16), output ``logits`` float32 [batch, 10];
three conv+BN+ReLU blocks, two max-pools, a hidden dense layer. About 62k parameters (< 300 kB).
Metadata: name ``digits-cnn``, ``labels`` (JSON list) and ``preprocessing`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_data

log = logging.getLogger("train_digits_cnn")
REPO = Path(__file__).resolve().parents[2]
OPSET = 17


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(1, 32), block(32, 32), nn.MaxPool2d(2),  # 8x8 -> 4x4
            block(32, 64), nn.MaxPool2d(2),  # 4x4 -> 2x2
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction (zero fill): cheap, label-preserving."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    n = x.shape[0]
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
    return out


def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean() * 100.0)


def train(epochs: int, seed: int) -> tuple[nn.Module, dict[str, float]]:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    split = digits_data.load_split()
    generator = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=epochs * ((len(split.y_train) + 63) // 64)
    )
    x_train, y_train = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            xb = _augment(x_train[idx], generator)
            loss = nn.functional.cross_entropy(model(xb), y_train[idx], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        if (epoch + 1) % 10 == 0:
            val = _accuracy(model, split.x_validation, split.y_validation)
            log.info("epoch %d: loss %.4f, validation accuracy %.2f%%", epoch + 1, loss.item(), val)
    scores = {
        "train": _accuracy(model, split.x_train, split.y_train),
        "validation": _accuracy(model, split.x_validation, split.y_validation),
        "test": _accuracy(model, split.x_test, split.y_test),
    }
    return model.eval(), scores


def export(model: nn.Module, out: Path, scores: dict[str, float]) -> None:
    dummy = torch.zeros(1, 1, 8, 8)
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model,
        (dummy,),
        str(tmp),
        input_names=[digits_data.INPUT_NAME],
        output_names=["logits"],
        dynamic_axes={digits_data.INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )
    proto = onnx.load(str(tmp))
    tmp.unlink()
    proto.doc_string = "Small CNN classifying 8x8 handwritten digits (scikit-learn digits)."
    proto.producer_name = "edgepack/scripts/models/train_digits_cnn.py"
    meta = {
        "name": "digits-cnn",
        "labels": json.dumps([str(d) for d in range(10)]),
        "preprocessing": json.dumps(
            {"layout": "NCHW", "scale": digits_data.PIXEL_SCALE, "source": "grey 0..16 pixels, 8x8"}
        ),
        "task": "classification",
        "heldout_test_accuracy": f"{scores['test']:.2f}",
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "models" / "digits_cnn.onnx")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, scores = train(args.epochs, args.seed)
    log.info("accuracy: %s", ", ".join(f"{k} {v:.2f}%" for k, v in scores.items()))
    export(model, args.out, scores)
    log.info("wrote %s (%d bytes)", args.out, args.out.stat().st_size)


if __name__ == "__main__":
    main()
