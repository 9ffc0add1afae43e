"""Build the benchmark's ResNet-class model: a ResNet-50 trained briefly on real digits, exported to ONNX.

The int8 benchmark (``scripts/bench/bench_ort_int8.py``) needs a ResNet-50-sized CNN whose top-1 means
something, and no pretrained weights can be downloaded here. So this script trains the standard ResNet-50
topology (bottleneck blocks [3, 4, 6, 3], widths 64..2048, torchvision's layout, written out here because
torchvision is not installed) on scikit-learn's digits upsampled to ``--size`` pixels and replicated to
three channels, for a bounded time, and exports ``input`` float32 [batch, 3, height, width] -> ``logits``
[batch, 10] (fully convolutional: the benchmark times it at 224x224 and scores it at the trained size).
It is not committed (about 95 MB): the benchmark builds it into ``.cache/bench/`` on first use.

Runs in the training venv (PyTorch):

    /work/venvs/train/bin/python scripts/models/train_resnet50_digits.py --out .cache/bench/resnet50.onnx
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_data

log = logging.getLogger("train_resnet50_digits")


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        return self.relu(self.body(x) + identity)


class ResNet50(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )  # fmt: skip
        layers: list[nn.Module] = []
        cin = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def to_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """[N, 1, 8, 8] in [0, 1] -> [N, 3, size, size], bilinear, ImageNet-style normalised."""
    x = torch.from_numpy(images)
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.25
    return x.repeat(1, 3, 1, 1).numpy()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=15.0, help="stop training after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    split = digits_data.load_split()
    model = ResNet50()
    batch = 32
    steps = args.epochs * ((len(split.y_train) + batch - 1) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.2)
    x_train = torch.from_numpy(split.x_train)
    y_train = torch.from_numpy(split.y_train)
    generator = torch.Generator().manual_seed(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    step = 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            xb = torch.from_numpy(to_rgb(x_train[idx].numpy(), args.size))
            loss = nn.functional.cross_entropy(model(xb), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 10 == 0:
                log.info("epoch %d step %d/%d loss %.3f", epoch + 1, step, steps, loss.item())
            if time.monotonic() > deadline:
                break
        if time.monotonic() > deadline:
            log.info("time budget reached after %d steps", step)
            break

    model.eval()
    with torch.no_grad():
        correct = 0
        for start in range(0, len(split.y_validation), 50):
            xb = torch.from_numpy(to_rgb(split.x_validation[start : start + 50], args.size))
            correct += int((model(xb).argmax(1).numpy() == split.y_validation[start : start + 50]).sum())
    log.info("validation accuracy %.2f%%", 100.0 * correct / len(split.y_validation))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, args.size, args.size),),
        str(args.out),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    proto = onnx.load(str(args.out))
    proto.metadata_props.add(key="name", value="resnet50-digits")
    onnx.save(proto, str(args.out))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
