"""Build the dynamic-int8 benchmark's transformer: a small ViT trained on real digits, exported to ONNX.

The x86 compiler tries dynamic int8 next to static int8 on MatMul-heavy models and keeps whichever is
faster (``compiler/accuracy_aware.py``); ``scripts/bench/bench_ort_transformer.py`` measures that choice
on a real transformer, and none can be downloaded here. So this script trains a pre-norm transformer
encoder classifier (BERT-base's block shape at a smaller width: multi-head self-attention and a GELU MLP,
written out with plain Linear/MatMul so it exports to ONNX without torch's fused fast path) on
scikit-learn's digits upsampled to 32x32 and cut into 4x4 patches: 64 tokens plus a class token.

The patch embedding is a reshape and a Linear (no Conv), as a text model's token embedding would be a
Gather: the exported graph is MatMul/Add/Softmax/LayerNorm only, which is the case the compiler's dynamic
path exists for. Input ``input`` float32 [batch, 1, 8, 8] (the same digits layout as the sample model;
the upsampling is in the graph), output ``logits`` [batch, 10].

Runs in the training venv (PyTorch); about a minute on 2 cores:

    /work/venvs/train/bin/python scripts/models/train_vit_digits.py --out .cache/bench/vit_digits.onnx
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_data

log = logging.getLogger("train_vit_digits")

IMAGE = 32
PATCH = 4


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax(q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsViT(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, classes: int = 10) -> None:
        super().__init__()
        tokens = (IMAGE // PATCH) ** 2
        self.embed = nn.Linear(PATCH * PATCH, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, 4 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)
        side = IMAGE // PATCH
        patches = x.reshape(-1, side, PATCH, side, PATCH).permute(0, 1, 3, 2, 4).reshape(-1, side * side, PATCH**2)
        tokens = self.embed(patches)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--minutes", type=float, default=5.0, help="stop training after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    split = digits_data.load_split()
    model = DigitsViT(args.dim, args.depth, args.heads)
    batch = 64
    steps = args.epochs * ((len(split.y_train) + batch - 1) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    x_train = torch.from_numpy(split.x_train)
    y_train = torch.from_numpy(split.y_train)
    generator = torch.Generator().manual_seed(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        log.info("epoch %d loss %.3f", epoch + 1, loss.item())
        if time.monotonic() > deadline:
            log.info("time budget reached after %d epochs", epoch + 1)
            break

    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(split.x_validation)).argmax(1).numpy()
    log.info("validation accuracy %.2f%%", 100.0 * (predicted == split.y_validation).mean())

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 8, 8),),
        str(args.out),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    proto = onnx.load(str(args.out))
    proto.metadata_props.add(key="name", value="vit-digits")
    onnx.save(proto, str(args.out))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
