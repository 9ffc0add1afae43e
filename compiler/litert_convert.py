"""The LiteRT family's converter: the bundle carries a ``.tflite`` model that LiteRT (XNNPACK) runs.

* ONNX source: onnx2tf in the managed ``tflite`` toolchain makes the float TFLite model, with the source's
  names, output order and layouts recorded (:mod:`edgepack.compiler.tflite_convert`); its log goes into
  the bundle (``logs/onnx2tf.log``, role ``log``) with the compile report.
* TFLite source: the user's file, validated by loading it (:mod:`edgepack.compiler.load_tflite`), its
  inputs and outputs named by its signature; a model that is already int8 is packaged as it is.
* int8: ai-edge-quantizer static int8 with the accuracy-aware search
  (:mod:`edgepack.compiler.tflite_quantize`); fp32: the float model.

Every candidate is judged on this host with the shared LiteRT backend (the agent's own) through the
pipeline's ``evaluate``. The float model is the baseline of the speed comparison (same runtime, this CPU).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.bundle import BundleFile
from edgepack.compiler.family import (
    CompiledModel,
    Conversion,
    ConvertJob,
    HostModel,
    SourceFormat,
    host_latency_ms,
)
from edgepack.compiler.tflite_convert import LOG_NAME, convert_onnx
from edgepack.compiler.tflite_graph import describe, rewrite_io
from edgepack.compiler.tflite_quantize import RECIPE, search_int8
from edgepack.compiler.toolchain import find_toolchain
from edgepack.errors import CompileError, ConfigError
from edgepack.manifest import TensorSpec
from edgepack.targets.registry import Precision, Target
from edgepack.versions import installed_version

log = logging.getLogger(__name__)

MODEL_FILE = "model.tflite"
LOG_FILE = f"logs/{LOG_NAME}"


@dataclass(frozen=True)
class FloatTflite:
    """The float TFLite model a conversion starts from, with its manifest signature."""

    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    quantized: bool  # a TFLite source that is int8 already
    log: Path | None  # onnx2tf's log (ONNX sources)
    report: dict[str, Any]


@dataclass(frozen=True)
class LiteRtConverter:
    """Float TFLite through onnx2tf, int8 through ai-edge-quantizer, judged with LiteRT on this host."""

    runtime: str = "litert"
    source_formats: tuple[SourceFormat, ...] = ("onnx", "tflite")

    def convert(self, job: ConvertJob) -> Conversion:
        base = _float_model(job)
        if base.quantized:
            return self._as_given(job, base)
        if job.precision == "int8":
            return self._int8(job, base)
        if job.precision != "fp32":
            raise ConfigError(f"target {job.target.name!r} compiles int8 or fp32, not {job.precision}")
        host = _host(job.target, base.path, "fp32", base)
        return Conversion.single_try(job, "fp32", host, lambda: _compiled(job.target, host, base, None))

    def _int8(self, job: ConvertJob, base: FloatTflite) -> Conversion:
        import ai_edge_quantizer  # noqa: F401  (fails here, not mid-search, when it is missing)

        feeds = job.calibration.feeds
        outcome = search_int8(
            base.path,
            job.workdir,
            calibration=feeds,
            analysis_feeds=feeds[:16],
            inputs=base.inputs,
            evaluate=lambda path: job.evaluate(_host(job.target, path, "int8", base)),
            on_try=job.note,
        )
        compiled = None
        if outcome.model is not None:
            model = outcome.model
            quantization = {
                "precision": "int8",
                "tool": f"ai-edge-quantizer {installed_version('ai-edge-quantizer')}",
                "recipe": RECIPE,
                "weights": "int8 symmetric, per channel",
                "activations": "int8 asymmetric, per tensor (MinMax calibration)",
                "io": "int8 with one scale each; the manifest keeps float32 and LiteRT converts at the edges",
                "full_integer": model.full_integer,
                "ops_int8": model.ops_int8,
                "ops_float": model.ops_float,
                "nodes_in_float": outcome.nodes_in_float,
                "kept_in_float": [k.to_dict() for k in outcome.kept_in_float],
                "conversion": base.report,
            }
            host = _host(job.target, model.path, "int8", base)
            compiled = _compiled(job.target, host, base, quantization)
            compiled.kept_in_float = list(outcome.kept_in_float)
        baseline = _host(job.target, base.path, "fp32", base) if compiled is not None else None
        return Conversion(
            "int8", compiled, outcome.report, list(outcome.tries), list(outcome.kept_in_float), baseline=baseline
        )

    def _as_given(self, job: ConvertJob, base: FloatTflite) -> Conversion:
        if job.precision != "int8":
            raise ConfigError(f"{job.model.path.name} is quantized already; compile it with --precision int8 (or auto)")
        host = _host(job.target, base.path, "int8", base)
        given = {"precision": "int8", "tool": "quantized before compiling"}
        return Conversion.single_try(job, "int8", host, lambda: _compiled(job.target, host, base, given))

    def latency_ms(self, model: HostModel, feed: Mapping[str, np.ndarray], *, threads: int, budget_s: float) -> float:
        if model.inputs is None or model.outputs is None:
            raise CompileError(f"{model.path.name}: the LiteRT converter's host models carry their signature")
        return host_latency_ms(model, model.inputs, model.outputs, feed, threads=threads, budget_s=budget_s)

    def toolchain(self) -> dict[str, str]:
        versions = {
            "ai-edge-litert": installed_version("ai-edge-litert"),
            "ai-edge-quantizer": installed_version("ai-edge-quantizer"),
        }
        chain = find_toolchain("tflite")
        if chain is not None:
            versions.update({f"tflite-toolchain/{k}": v for k, v in chain.key_versions().items()})
            versions["tflite-toolchain"] = chain.spec.folder_name
        return versions


# --- the float model -------------------------------------------------------------------------------


def _float_model(job: ConvertJob) -> FloatTflite:
    """The float TFLite model of ``job.model``, converted once per compile (cached in the workdir)."""
    cache = job.workdir / "litert-float.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        return FloatTflite(
            path=Path(data["path"]),
            inputs=[TensorSpec.model_validate(s) for s in data["inputs"]],
            outputs=[TensorSpec.model_validate(s) for s in data["outputs"]],
            quantized=data["quantized"],
            log=Path(data["log"]) if data["log"] else None,
            report=data["report"],
        )
    if job.model.format == "onnx":
        converted = convert_onnx(
            job.model.path,
            job.workdir,
            inputs=job.model.inputs,
            outputs=job.model.outputs,
            samples=job.calibration.feeds[:20],
            on_progress=job.note,
        )
        base = FloatTflite(
            converted.path, converted.inputs, converted.outputs, False, converted.log_path, converted.report()
        )
    else:
        base = _tflite_source(job)
    cache.write_text(
        json.dumps(
            {
                "path": str(base.path),
                "inputs": [s.model_dump(mode="json") for s in base.inputs],
                "outputs": [s.model_dump(mode="json") for s in base.outputs],
                "quantized": base.quantized,
                "log": str(base.log) if base.log else None,
                "report": base.report,
            }
        )
    )
    return base


def _tflite_source(job: ConvertJob) -> FloatTflite:
    """A user's ``.tflite``: copied, with its signature keys as tensor names (so both name it the same)."""
    info = describe(job.model.path)
    if info.subgraphs != 1:
        raise CompileError(
            f"{job.model.path.name} has {info.subgraphs} subgraphs; edgepack compiles single-subgraph TFLite models"
        )
    path = job.workdir / "source.tflite"
    names_in = {t.index: t.key or t.name for t in info.inputs}
    names_out = {t.index: t.key or t.name for t in info.outputs}
    wanted = {s.name for s in [*job.model.inputs, *job.model.outputs]}
    if set(names_in.values()) | set(names_out.values()) != wanted:
        raise CompileError(
            f"{job.model.path.name}: its signature {sorted(names_in.values())} -> {sorted(names_out.values())} "
            f"does not match what LiteRT reported ({sorted(wanted)})"
        )
    order_out = [next(i for i, n in names_out.items() if n == s.name) for s in job.model.outputs]
    order_in = [next(i for i, n in names_in.items() if n == s.name) for s in job.model.inputs]
    rewrite_io(
        job.model.path,
        path,
        input_names=names_in,
        output_names=names_out,
        input_order=order_in,
        output_order=order_out,
    )
    quantized = any(t.quantized for t in [*info.inputs, *info.outputs]) or any(
        op.op in ("QUANTIZE", "DEQUANTIZE") for op in info.ops
    )
    return FloatTflite(
        path=path,
        inputs=list(job.model.inputs),
        outputs=list(job.model.outputs),
        quantized=quantized,
        log=None,
        report={"converter": "none (TFLite source)", "ops": info.op_counts()},
    )


# --- host models and the bundle --------------------------------------------------------------------


def _host(target: Target, path: Path, precision: Precision, base: FloatTflite) -> HostModel:
    """``path`` run by LiteRT with the family's host plan, loaded with the converter's signature (its
    layouts: the pipeline feeds and reads the source's NCHW tensors, the backend transposes)."""
    plan = target.family.host_plan(target, precision=precision)
    return HostModel(path, "litert", plan, inputs=list(base.inputs), outputs=list(base.outputs))


def _compiled(target: Target, host: HostModel, base: FloatTflite, quantization: dict[str, Any] | None) -> CompiledModel:
    files = [BundleFile(MODEL_FILE, host.path, "model")]
    if base.log is not None and base.log.is_file():
        files.append(BundleFile(LOG_FILE, base.log, "log"))
    return CompiledModel(
        host=host,
        files=files,
        model_file=MODEL_FILE,
        inputs=list(base.inputs),
        outputs=list(base.outputs),
        runtime_version=target.family.runtime_version(target, opset=0),
        quantization=quantization,
    )


CONVERTER = LiteRtConverter()
