"""Runs onnx2tf inside the tflite toolchain; edgepack starts it as ``python onnx2tf_driver.py REQUEST.json``.

This file is executed by the toolchain's interpreter, not imported by edgepack: it may use only the
standard library and what the toolchain has (onnx2tf, TensorFlow, onnx). It exists, rather than calling
the ``onnx2tf`` command, for two reasons:

* errors come back structured: onnx2tf attaches the failing ONNX node to its exception
  (``onnx_op_name``); the driver writes that node, its op type and the message to the result JSON, so
  edgepack can say "node X (op Y) cannot be converted" instead of pointing at 3000 lines of log;
* it measures the conversion (wall time, peak memory of this process and of the onnxsim children);
* it makes the float ``.tflite`` from the saved model onnx2tf writes, instead of letting onnx2tf make it
  from its Keras model (and then a float16 copy edgepack never uses). onnx2tf has no switch for either,
  and its Keras route is slow: on the benchmark ResNet-50, ``TFLiteConverter.from_keras_model`` took
  about 95 s per file (212 s for the whole conversion, 17 s now), while ``from_saved_model`` on the saved model
  it had already written took 4 s for the same flatbuffer (the same 77 ops; outputs equal bit for bit).
  :func:`_keras_float_conversions_skipped` answers onnx2tf's float ``convert()`` calls (no
  optimizations, or float16 weights) with an empty model while it runs; its int8 converters (the
  benchmark's comparison path) set ``optimizations`` and run as before. Then
  :func:`_write_float_tflite` converts the saved model, or, should onnx2tf not have written one, the
  Keras model it returns, the slow way.

Request (JSON): ``onnx`` (a copy: onnx2tf rewrites its input in place), ``output_dir``, ``result``,
and optional ``int8_calibration`` ({input name: .npy of NHWC samples}) for onnx2tf's own full-integer
path (used only by the benchmark that compares it with ai-edge-quantizer). The caller sets the working
directory (where onnx2tf looks for its sample-image file) and blocks the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any


def main(request_path: str) -> int:
    with open(request_path) as fh:
        request = json.load(fh)
    result: dict = {"ok": False}
    start = time.perf_counter()
    try:
        import onnx2tf

        result["onnx2tf"] = getattr(onnx2tf, "__version__", "unknown")
        calibration = request.get("int8_calibration")
        kwargs = {
            "input_onnx_file_path": request["onnx"],
            "output_folder_path": request["output_dir"],
            # Signature defs ("-osd") key inputs/outputs by their ONNX names. They cost conversion time, but
            # without them an output that is also read inside the graph goes missing from the .tflite
            # (measured: a Relu output feeding Flatten and also a graph output).
            "output_signaturedefs": True,
            "not_use_opname_auto_generate": True,  # edgepack names every node itself
            # TFLite has no builtin Erf: onnx2tf's tf.math.erf becomes a TensorFlow (Flex) op, which LiteRT
            # cannot run. Its "pseudo" Erf is Abramowitz-Stegun 7.1.26 in builtin ops (|error| < 1.5e-7).
            # Exact GELUs arrive already fused into Gelu nodes (gelu_fusion.py) and become TFLite's GELU.
            # (This API wants lower-case names.)
            "replace_to_pseudo_operators": ["erf"],
            "non_verbose": False,
            "verbosity": "info",
        }
        if request.get("keep_layout_inputs"):
            # inputs that are no images (an RNN state [2, 1, 128]): onnx2tf would make them channel-last
            kwargs["keep_ncw_or_nchw_or_ncdhw_input_names"] = list(request["keep_layout_inputs"])
        if calibration:
            kwargs.update(
                output_integer_quantized_tflite=True,
                quant_type="per-channel",
                # [name, npy, mean, std]: the data is already normalized, so mean 0 and std 1
                custom_input_op_name_np_data_path=[[name, path, 0.0, 1.0] for name, path in calibration.items()],
                input_quant_dtype="int8",
                output_quant_dtype="int8",
            )
        with _keras_float_conversions_skipped():
            model = onnx2tf.convert(**kwargs)
        result["float_tflite_from"] = _write_float_tflite(request["output_dir"], model)
        result["ok"] = True
    except BaseException as exc:  # report every failure to edgepack, which raises a named error
        result["error_type"] = type(exc).__name__
        result["error"] = str(exc)[-2000:]
        result["node"] = getattr(exc, "onnx_op_name", None)
        result["not_builtin_ops"] = exc.ops if isinstance(exc, NotBuiltinError) else None
        result["traceback"] = traceback.format_exc()[-6000:]
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["peak_rss_children_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    with open(request["result"] + ".tmp", "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(request["result"] + ".tmp", request["result"])
    return 0 if result["ok"] else 3


FLOAT_TFLITE = "model_float32.tflite"
_CONVERTERS = ("TFLiteKerasModelConverterV2", "TFLiteFrozenGraphConverterV2", "TFLiteSavedModelConverterV2")


@contextlib.contextmanager
def _keras_float_conversions_skipped() -> Iterator[None]:
    """While onnx2tf runs, its float conversions return an empty model (see the module docstring).

    Each converter class onnx2tf may get has its own ``convert`` that traces and freezes the graph before
    the shared base does the rest, so the check goes on each of them (and comes off afterwards)."""
    from tensorflow.lite.python import lite

    def guarded(original: Any) -> Any:
        def convert(self: Any) -> Any:
            float16 = any(getattr(t, "name", t) == "float16" for t in (self.target_spec.supported_types or ()))
            if float16 or not self.optimizations:
                return b""
            return original(self)

        return convert

    originals = {name: getattr(lite, name).__dict__["convert"] for name in _CONVERTERS}
    try:
        for name, original in originals.items():
            getattr(lite, name).convert = guarded(original)
        yield
    finally:
        for name, original in originals.items():
            getattr(lite, name).convert = original


class NotBuiltinError(Exception):
    """The converted graph needs TensorFlow ops that TFLite's builtin op set lacks."""

    def __init__(self, ops: list[str], details: str) -> None:
        super().__init__(f"TensorFlow ops with no TFLite builtin: {', '.join(ops)}; {details[-1500:]}")
        self.ops = ops


def _write_float_tflite(output_dir: str, keras_model: Any) -> str:
    """Write ``model_float32.tflite`` (builtin ops, TF ops where needed, as onnx2tf sets them) and drop
    the empty files onnx2tf wrote; says which route made it."""
    import tensorflow as tf

    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.endswith(".tflite") and os.path.getsize(path) == 0:
            os.remove(path)
    # Builtin ops only (onnx2tf also allows TensorFlow "Flex" ops): LiteRT, the devices' runtime, has no
    # Flex delegate, so a model that needs one must fail here, naming the ops, not on the device.
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    route = "saved_model"
    try:
        try:
            converter = tf.lite.TFLiteConverter.from_saved_model(output_dir, signature_keys=["serving_default"])
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # no usable saved model: onnx2tf's route
            print(f"edgepack: no saved model to convert ({exc}); converting the Keras model", flush=True)
            route = "keras_model"
            converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
        converter.target_spec.supported_ops = ops
        flatbuffer = converter.convert()
    except Exception as exc:
        flex = sorted(set(re.findall(r"\btf\.([A-Za-z0-9_]+)\(", str(exc))))
        if flex:
            raise NotBuiltinError(flex, str(exc)) from exc
        raise
    with open(os.path.join(output_dir, FLOAT_TFLITE), "wb") as fh:
        fh.write(flatbuffer)
    print(f"edgepack: {FLOAT_TFLITE} written from the {route}", flush=True)
    return route


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
