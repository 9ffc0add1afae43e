"""Pipeline step 3 (int8): post-training quantization with onnxruntime's tooling, QDQ format.

Static quantization (the default): calibrate activation ranges on the user's calibration data (MinMax),
then insert QuantizeLinear/DequantizeLinear pairs around the ops onnxruntime runs in int8 (Conv, MatMul,
Gemm, Add, pooling, ...), with per-channel weights. The settings are the target's
(:meth:`Int8Settings.for_target`), chosen by measuring — see ``scripts/bench/bench_ort_int8.py``:

* x86 CPU: unsigned activations (u8, asymmetric) with signed weights (s8, symmetric, 7-bit range).
  onnxruntime's default, s8 activations, ran at 1.17x fp32 with 1 thread and 0.77x (slower) with 2 on
  a ResNet-50; u8/s8 hits the fast u8s8 kernels (about 2x), and the 7-bit weight range
  (``reduce_range``) keeps those kernels from saturating on CPUs without VNNI, where full-range weights
  cost 6-29 points of top-1 agreement — at no cost in speed.
* TensorRT targets (GPU/Jetson): s8 symmetric activations and weights, the form TensorRT's explicit
  quantization expects.

Per-channel weights in QDQ need opset >= 13 (``DequantizeLinear``'s ``axis``) or onnxruntime refuses the
model; ``quant_pre_process`` does not raise the opset that far, so :func:`ensure_opset` does.

Dynamic quantization (weights int8, activations quantized on the fly) is offered for MatMul-heavy models
(transformers) where it can be faster; the accuracy-aware driver measures and picks.

Calibration ranges are cached in a JSON file per compile and method, so re-quantizing with other nodes kept
in float does not run the calibration again. Calibration is streamed: onnxruntime's calibrator is fed one
sample per ``collect_data`` (its strided mode, ``CalibStridedMinMax=1``) and reduces it to statistics —
min/max, or for ``percentile``/``entropy`` per-tensor histograms merged sample by sample — before the next,
so memory is one sample's activations whatever the number of samples. Without the stride the histogram
methods hold every activation of every sample (measured on a 640×640 DBNet detector: 6 GB at 8 samples,
24 GB at 32).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from edgepack.compiler.quantizer_failures import quantizer_failures
from edgepack.errors import QuantizerError
from edgepack.targets.registry import Target

log = logging.getLogger(__name__)

MIN_QDQ_OPSET = 13


@dataclass(frozen=True)
class Int8Settings:
    """How to quantize; recorded in the manifest's ``quantization``."""

    method: Literal["static", "dynamic"] = "static"
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    activation_symmetric: bool = False
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"

    @classmethod
    def for_target(cls, target: Target) -> Int8Settings:
        return cls(**dict(target.options.get("int8", {})))

    def dynamic(self) -> Int8Settings:
        return replace(self, method="dynamic", activation_type="uint8", activation_symmetric=False)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "QDQ" if self.method == "static" else "dynamic", **asdict(self)}


def ensure_opset(proto: onnx.ModelProto, minimum: int = MIN_QDQ_OPSET) -> onnx.ModelProto:
    """``proto`` converted to opset ``minimum`` when it is older (per-channel QDQ needs 13)."""
    current = next(i.version for i in proto.opset_import if i.domain in ("", "ai.onnx"))
    if current >= minimum:
        return proto
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(proto, minimum)
        onnx.checker.check_model(converted)
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        raise QuantizerError(
            f"int8 with per-channel weights needs ONNX opset >= {minimum}; converting this opset-{current} "
            f"model failed ({exc}); re-export it with opset {minimum} or newer"
        ) from exc
    log.info("opset %d -> %d for per-channel QDQ", current, minimum)
    return converted


def quantize_int8(
    src: Path,
    dst: Path,
    calibration: Sequence[dict[str, np.ndarray]],
    settings: Int8Settings,
    *,
    nodes_to_exclude: Sequence[str] = (),
    calibration_cache: Path | None = None,
    on_sample: Callable[[], None] | None = None,
) -> None:
    """Quantize the float model at ``src`` into ``dst`` with ``settings``; ``nodes_to_exclude`` stay float.

    A failure inside onnxruntime's quantization tooling is raised as :class:`QuantizerError`; bad
    calibration data never gets here (the data step checked it against the model)."""
    import onnxruntime

    with (
        quantizer_failures(f"onnxruntime {onnxruntime.__version__}", f"{settings.method} int8"),
        _without_preprocess_hint(),
    ):
        _quantize(src, dst, calibration, settings, nodes_to_exclude, calibration_cache, on_sample)


def _quantize(
    src: Path,
    dst: Path,
    calibration: Sequence[dict[str, np.ndarray]],
    settings: Int8Settings,
    nodes_to_exclude: Sequence[str],
    calibration_cache: Path | None,
    on_sample: Callable[[], None] | None,
) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    if settings.method == "dynamic":
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            weight_type=qtype[settings.weight_type],
            nodes_to_exclude=list(nodes_to_exclude),
            extra_options={"MatMulConstBOnly": True},
        )
        return

    class _Reader(CalibrationDataReader):
        """The calibration samples; ``set_range`` is how onnxruntime's strided calibration walks them."""

        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(calibration)

        def __len__(self) -> int:
            return len(calibration)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(calibration[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self._it, None)
            if feed is not None and on_sample is not None:
                on_sample()
            return feed

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    cache_kwargs: dict[str, Any] = {}
    if calibration_cache is not None and "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        cache_kwargs["calibration_cache_path"] = str(calibration_cache)
    quantize_static(
        str(src),
        str(dst),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=qtype[settings.activation_type],
        weight_type=qtype[settings.weight_type],
        per_channel=settings.per_channel,
        reduce_range=settings.reduce_range,
        calibrate_method=methods[settings.calibrate_method],
        nodes_to_exclude=list(nodes_to_exclude),
        extra_options={
            "ActivationSymmetric": settings.activation_symmetric,
            "WeightSymmetric": True,
            # one sample per collect_data call: the calibrator reduces each sample to its statistics (min/max,
            # or per-tensor histograms that it merges) before the next; without a stride the histogram
            # methods keep every activation of every sample (a 640x640 detector: 6 GB per 8 samples)
            "CalibStridedMinMax": 1,
        },
        **cache_kwargs,
    )


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextmanager
def _without_preprocess_hint() -> Iterator[None]:
    """Silence onnxruntime's root-logger advice to run quant_pre_process: the optimize step did that job."""
    root = logging.getLogger()
    hint = _DropPreprocessHint()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def has_const_matmul_without_conv(proto: onnx.ModelProto) -> bool:
    """True for MatMul-heavy models (transformers, MLPs) where dynamic int8 may beat static."""
    ops = {n.op_type for n in proto.graph.node}
    if ops & {"Conv", "ConvTranspose"}:
        return False
    weights = {t.name for t in proto.graph.initializer}
    return any(n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights for n in proto.graph.node)
