"""Pipeline step 1 for a TFLite source model: check the file, read its signature, pick the reference runtime.

The ONNX path (:mod:`edgepack.compiler.load`) can check a graph op by op; a ``.tflite`` flatbuffer is
checked by the runtime that reads it. The *reference* — what the original model computes, against which
the compiled one is judged — is LiteRT's interpreter (the reference implementation of TFLite) when
``ai-edge-litert`` is installed on the build host; otherwise the target's own runtime, if it reads TFLite
(OpenVINO does), and the accuracy report says which one it was. The signature is the one that runtime
reports: LiteRT uses the signature's names (``x``), not the converter's tensor names
(``serving_default_x:0``), and converters must keep those names (see :mod:`edgepack.compiler.family`).

TFLite models carry static shapes as exported; ``--input-shape`` is accepted only where it repeats them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.compiler.family import HostModel
from edgepack.errors import (
    ConfigError,
    ModelLoadError,
    RuntimeBackendError,
    RuntimeNotInstalledError,
    UnsupportedModelError,
)
from edgepack.manifest import TensorSpec
from edgepack.runtimes.base import get_backend
from edgepack.targets.registry import Target

log = logging.getLogger(__name__)

TFLITE_MAGIC = b"TFL3"  # the flatbuffer file identifier, bytes 4..8


@dataclass
class TfliteSource:
    """A TFLite model the pipeline compiles, with the runtime that computes its reference outputs."""

    path: Path
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    reference: HostModel
    metadata: dict[str, str] = field(default_factory=dict)
    fixed_shapes: dict[str, list[int]] = field(default_factory=dict)
    format: str = "tflite"

    @property
    def name(self) -> str | None:
        return self.metadata.get("name")


def is_tflite(path: Path) -> bool:
    """True when ``path`` is a TFLite flatbuffer (by its file identifier, whatever its suffix)."""
    try:
        with Path(path).open("rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return len(head) == 8 and head[4:8] == TFLITE_MAGIC


def load_tflite(
    path: Path, target: Target, source_formats: Sequence[str], input_shapes: Mapping[str, Sequence[int]] | None = None
) -> TfliteSource:
    """Check ``path`` for ``target`` and read its signature; see the module docstring."""
    path = Path(path)
    if "tflite" not in source_formats:
        raise UnsupportedModelError(
            f"{path.name} is a TFLite model and target {target.name!r} ({target.runtime}) compiles "
            f"{', '.join(source_formats)} models only; convert it to ONNX (e.g. with tf2onnx) or pick a "
            "target whose runtime reads TFLite"
        )
    data = path.read_bytes()
    reference = HostModel(path, _reference_runtime(target), {"inference_precision": "f32"})
    try:
        described = get_backend(reference.runtime).load(path)
    except RuntimeBackendError as exc:
        raise ModelLoadError(f"{path} is not a TFLite model {reference.runtime} can read: {exc}") from exc
    try:
        inputs, outputs = list(described.inputs), list(described.outputs)
    finally:
        described.close()
    for spec in inputs:
        if not spec.is_static and target.static_shapes:
            raise UnsupportedModelError(
                f"input {spec.name!r} of {path.name} has dynamic dimensions (shape {spec.shape}) and target "
                f"{target.name!r} needs static shapes; re-export the TFLite model with a fixed input shape"
            )
    known = {s.name: s for s in inputs}
    for name, dims in (input_shapes or {}).items():
        if name not in known or list(known[name].shape) != list(dims):
            have = ", ".join(f"{s.name} {s.shape}" for s in inputs)
            raise ConfigError(
                f"--input-shape {name}={','.join(map(str, dims))}: a TFLite model's input shapes are fixed when "
                f"it is exported (this one has {have}); re-export it with the shape you need"
            )
    log.info("loaded %s (TFLite): inputs %s, reference %s", path.name, [(i.name, i.shape) for i in inputs], reference)
    return TfliteSource(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        inputs=inputs,
        outputs=outputs,
        reference=reference,
        metadata={"name": path.stem},
    )


def _reference_runtime(target: Target) -> str:
    if _installed("litert"):
        return "litert"
    # a family that converts TFLite reads it with its own runtime (OpenVINO does)
    log.info("ai-edge-litert is not installed; the TFLite reference outputs come from %s", target.runtime)
    return target.runtime


def _installed(name: str) -> bool:
    try:
        get_backend(name)
    except RuntimeNotInstalledError:
        return False
    return True
