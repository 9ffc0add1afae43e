"""Pipeline step 3 (fp16): convert float32 weights and compute to float16, keeping float32 inputs/outputs.

Uses onnxruntime's own converter (``onnxruntime.transformers.float16``), which ships inside the
onnxruntime wheel the compiler already needs — no extra dependency — and keeps the ops that are unsafe in
half precision (its default block list: Resize, range-sensitive reductions, ...) in float32 with Cast
nodes around them. ``keep_io_types=True`` keeps the model's signature float32, so clients and self-test
vectors do not change with the precision. (``onnxconverter_common``'s converter is the same code,
older; it is a separate install and gains nothing here.)
"""

from __future__ import annotations

import logging

import onnx

from edgepack.errors import UnsupportedModelError

log = logging.getLogger(__name__)


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of ``proto`` with float32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    try:
        half = convert_float_to_float16(copy, keep_io_types=True)
        OnnxModel(half).topological_sort()  # the converter appends its output Casts at the end
        onnx.checker.check_model(half)
    except (ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
        raise UnsupportedModelError(f"cannot convert the model to fp16: {exc}; try --precision fp32") from exc
    converted = sum(1 for t in half.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    log.info("fp16: %d initializers converted", converted)
    return half
