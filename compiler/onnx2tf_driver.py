"""Runs onnx2tf inside the tflite toolchain; edgepack starts it as ``python onnx2tf_driver.py REQUEST.json``.

This file is executed by the toolchain's interpreter, not imported by edgepack: it may use only the
standard library and what the toolchain has (onnx2tf, TensorFlow, onnx). It exists, rather than calling
the ``onnx2tf`` command, for two reasons:

* errors come back structured: onnx2tf attaches the failing ONNX node to its exception
  (``onnx_op_name``); the driver writes that node, its op type and the message to the result JSON, so
  edgepack can say "node X (op Y) cannot be converted" instead of pointing at 3000 lines of log;
* it measures the conversion (wall time, peak memory of this process and of the onnxsim children).

Request (JSON): ``onnx`` (a copy: onnx2tf rewrites its input in place), ``output_dir``, ``result``,
and optional ``int8_calibration`` ({input name: .npy of NHWC samples}) for onnx2tf's own full-integer
path (used only by the benchmark that compares it with ai-edge-quantizer). The caller sets the working
directory (where onnx2tf looks for its sample-image file) and blocks the network.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback


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
            "non_verbose": False,
            "verbosity": "info",
        }
        if calibration:
            kwargs.update(
                output_integer_quantized_tflite=True,
                quant_type="per-channel",
                # [name, npy, mean, std]: the data is already normalized, so mean 0 and std 1
                custom_input_op_name_np_data_path=[[name, path, 0.0, 1.0] for name, path in calibration.items()],
                input_quant_dtype="int8",
                output_quant_dtype="int8",
            )
        onnx2tf.convert(**kwargs)
        result["ok"] = True
    except BaseException as exc:  # report every failure to edgepack, which raises a named error
        result["error_type"] = type(exc).__name__
        result["error"] = str(exc)[-2000:]
        result["node"] = getattr(exc, "onnx_op_name", None)
        result["traceback"] = traceback.format_exc()[-6000:]
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["peak_rss_children_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    with open(request["result"] + ".tmp", "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(request["result"] + ".tmp", request["result"])
    return 0 if result["ok"] else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
