"""The ONNX Runtime family's converter: the bundle carries an ONNX model that onnxruntime runs.

* int8: static QDQ with onnxruntime's tooling and the accuracy-aware search
  (:mod:`edgepack.compiler.accuracy_aware`, settings per target from :mod:`edgepack.compiler.quantize_ort`;
  the opset is raised to 13 first where needed for per-channel QDQ);
* fp16: :func:`edgepack.compiler.precision.to_fp16` (fp32 inputs/outputs kept);
* fp32: the optimized graph as it is.

Candidates are judged on this host with the onnxruntime backend and the family's host plan (the CPU
provider, plus e.g. the "basic" graph optimization level TensorRT int8 bundles record). Speed against fp32
is measured for CPU targets only: this host's CPU says nothing about a TensorRT device.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgepack.bundle import BundleFile
from edgepack.compiler.accuracy_aware import search_int8
from edgepack.compiler.family import CompiledModel, Conversion, ConvertJob, FloatModel, HostModel, SourceFormat
from edgepack.compiler.load import tensor_specs
from edgepack.compiler.precision import to_fp16
from edgepack.compiler.quantize_ort import Int8Settings, ensure_opset, has_const_matmul_without_conv
from edgepack.compiler.speed import latency_ms
from edgepack.errors import UnsupportedModelError
from edgepack.targets.registry import Precision, Target

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class OnnxRuntimeConverter:
    """QDQ int8 / fp16 / fp32 ONNX models for onnxruntime targets."""

    runtime: str = "onnxruntime"
    source_formats: tuple[SourceFormat, ...] = ("onnx", "tflite")

    def convert(self, job: ConvertJob) -> Conversion:
        if job.model.format != "tflite":
            return self._convert(job)
        job, converter = _from_tflite(job)
        conversion = self._convert(job)
        if conversion.compiled is not None:  # the manifest says which tool made the ONNX model
            quantization = dict(conversion.compiled.quantization or {"precision": job.precision})
            conversion.compiled.quantization = {**quantization, "source_converter": converter}
        return conversion

    def _convert(self, job: ConvertJob) -> Conversion:
        if job.model.format != "onnx":
            raise UnsupportedModelError(
                f"target {job.target.name!r} (onnxruntime) compiles ONNX and TFLite models, not {job.model.format}"
            )
        if job.precision == "int8":
            return self._int8(job)
        if job.precision == "fp16":
            path = job.workdir / "fp16.onnx"
            onnx.save(to_fp16(onnx.load(str(job.model.path))), str(path))
        else:
            path = job.model.path
        host = _host(job.target, path, job.precision)
        quantization = None
        if job.precision == "fp16":
            import onnxruntime

            quantization = {
                "precision": "fp16",
                "tool": f"onnxruntime.transformers.float16 {onnxruntime.__version__}",
                "keep_io_types": True,
            }
        return Conversion.single_try(job, job.precision, host, lambda: _compiled(job.target, host, quantization))

    def _int8(self, job: ConvertJob) -> Conversion:
        proto = onnx.load(str(job.model.path))
        ready = ensure_opset(proto)
        quant_input = job.model.path
        if ready is not proto:
            quant_input = job.workdir / "fp32-opset13.onnx"
            onnx.save(ready, str(quant_input))
        settings = Int8Settings.for_target(job.target)
        feeds = job.calibration.feeds
        outcome = search_int8(
            quant_input,
            job.workdir,
            calibration=feeds,
            analysis_feeds=feeds[:16],
            settings=settings,
            evaluate=lambda path: job.evaluate(_host(job.target, path, "int8")),
            try_dynamic=not job.target.options.get("tensorrt") and has_const_matmul_without_conv(ready),
            on_try=job.note,
        )
        compiled = None
        if outcome.model is not None:
            import onnxruntime

            quantization = {
                "precision": "int8",
                "tool": f"onnxruntime {onnxruntime.__version__}",
                **outcome.settings.to_dict(),
                "nodes_in_float": outcome.nodes_in_float,
                "kept_in_float": [k.to_dict() for k in outcome.kept_in_float],
            }
            compiled = _compiled(job.target, _host(job.target, outcome.model, "int8"), quantization)
            compiled.kept_in_float = list(outcome.kept_in_float)
        baseline = None
        if compiled is not None and not job.target.options.get("tensorrt"):
            baseline = HostModel(
                job.model.path, self.runtime, job.target.family.host_plan(job.target, precision="fp32")
            )
        return Conversion(
            "int8", compiled, outcome.report, list(outcome.tries), list(outcome.kept_in_float), baseline=baseline
        )

    def latency_ms(self, model: HostModel, feed: Mapping[str, np.ndarray], *, threads: int, budget_s: float) -> float:
        return latency_ms(model.path, feed, threads=threads, budget_s=budget_s)

    def toolchain(self) -> dict[str, str]:
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}


def _from_tflite(job: ConvertJob) -> tuple[ConvertJob, str]:
    """``job`` with its TFLite model converted to ONNX by tf2onnx (once per compile: the fp32 fallback of
    ``auto`` reuses the file); the candidates are still judged against LiteRT running the original."""
    from dataclasses import replace

    from edgepack.compiler.tflite_to_onnx import tflite_to_onnx

    out = job.workdir / "from-tflite.onnx"
    stamp = job.workdir / "from-tflite.tool"
    if not out.exists():
        _path, version = tflite_to_onnx(
            job.model.path, out, inputs=job.model.inputs, outputs=job.model.outputs, workdir=job.workdir, note=job.note
        )
        stamp.write_text(f"tf2onnx {version} (TFLite -> ONNX)")
    opset = next(
        i.version for i in onnx.load(str(out), load_external_data=False).opset_import if i.domain in ("", "ai.onnx")
    )
    converted = FloatModel(out, "onnx", job.model.inputs, job.model.outputs, opset=opset)
    return replace(job, model=converted), stamp.read_text()


def _host(target: Target, path: Path, precision: Precision) -> HostModel:
    return HostModel(path, "onnxruntime", target.family.host_plan(target, precision=precision))


def _compiled(target: Target, host: HostModel, quantization: dict[str, Any] | None) -> CompiledModel:
    proto = onnx.load(str(host.path), load_external_data=False)
    opset = next(i.version for i in proto.opset_import if i.domain in ("", "ai.onnx"))
    return CompiledModel(
        host=host,
        files=[BundleFile(MODEL_FILE, host.path, "model")],
        model_file=MODEL_FILE,
        inputs=tensor_specs(proto, "input"),
        outputs=tensor_specs(proto, "output"),
        runtime_version=target.family.runtime_version(target, opset=opset),
        quantization=quantization,
    )


CONVERTER = OnnxRuntimeConverter()
