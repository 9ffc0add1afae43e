"""The OpenVINO family's converter: ONNX or TFLite in, OpenVINO IR (``model.xml`` + ``model.bin``) out.

Conversion is OpenVINO's own (``openvino.convert_model``), which reads ONNX and TFLite alike; the IR is
saved with ``openvino.save_model``. Then, per precision:

* fp32 — weights kept in f32 (``compress_to_fp16=False``: ``save_model`` compresses to f16 by default);
* fp16 — weights compressed to f16 (GPU/NPU compute in f16);
* int8 — NNCF post-training quantization with the accuracy-aware search
  (:mod:`edgepack.compiler.openvino_quantize`).

Every candidate is judged with the shared OpenVINO backend on this host's CPU with the precision hint
pinned to f32 (``OpenVinoFamily.host_plan``), so what the report says is what a CPU device computes; the
manifest pins the device's precision (see ``targets/openvino_family.py``).

Models OpenVINO cannot take fail here, at compile time, with OpenVINO's reason and the source node:
ops with no conversion rule (the load step's ``unsupported_nodes`` already names them), and constructs
the converter accepts but the CPU plugin cannot compile — e.g. an ``If`` whose branches have different
ranks, which converts to a dynamic-rank ``If`` the plugin refuses. The converted model is compiled for
the CPU before anything else, so such a model never reaches a device.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.bundle import BundleFile
from edgepack.compiler.family import CompiledModel, Conversion, ConvertJob, FloatModel, HostModel, SourceFormat
from edgepack.compiler.speed import median_ms
from edgepack.errors import UnsupportedModelError
from edgepack.manifest import TensorSpec
from edgepack.targets.registry import Precision, Target

log = logging.getLogger(__name__)

MODEL_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
HOST_DEVICE = "CPU"


@dataclass(frozen=True)
class OpenVinoConverter:
    """OpenVINO IR at int8 (NNCF), fp16 weights or fp32, from ONNX or TFLite."""

    runtime: str = "openvino"
    source_formats: tuple[SourceFormat, ...] = ("onnx", "tflite")

    def convert(self, job: ConvertJob) -> Conversion:
        model = read_model(job.model)
        check_compiles(model, job.model)
        if job.precision == "int8":
            from edgepack.compiler.openvino_quantize import search_int8

            return search_int8(model, job)
        name = "fp16" if job.precision == "fp16" else "fp32"
        host = save_ir(job, model, name, fp16=job.precision == "fp16")
        quantization = None
        if job.precision == "fp16":
            quantization = {
                "precision": "fp16",
                "tool": f"openvino.save_model(compress_to_fp16=True) {openvino_version()}",
                "weights": "f16",
            }
        return Conversion.single_try(job, job.precision, host, lambda: compiled_model(job, host, quantization))

    def latency_ms(self, model: HostModel, feed: Mapping[str, np.ndarray], *, threads: int, budget_s: float) -> float:
        return latency_ms(model, feed, threads=threads, budget_s=budget_s)

    def toolchain(self) -> dict[str, str]:
        import nncf

        return {"openvino": openvino_version(), "nncf": nncf.__version__}


def openvino_version() -> str:
    import openvino as ov

    return str(ov.__version__).split("-", 1)[0]


def read_model(source: FloatModel) -> Any:
    """``source`` converted by OpenVINO, its inputs and outputs named as the source's signature."""
    import openvino as ov

    try:
        model = ov.convert_model(str(source.path))
    except (RuntimeError, *_frontend_failures()) as exc:
        raise UnsupportedModelError(
            f"OpenVINO {openvino_version()} cannot convert the model: {_reason(exc)}"
            + _where(_op_names(str(exc)), source)
        ) from exc
    _name_ports(model.inputs, source.inputs, "input", source)
    _name_ports(model.outputs, source.outputs, "output", source)
    return model


def check_compiles(model: Any, source: FloatModel) -> None:
    """Compile ``model`` for this host's CPU; UnsupportedModelError with OpenVINO's reason if it cannot."""
    import openvino as ov

    try:
        ov.Core().compile_model(model, HOST_DEVICE, {"INFERENCE_PRECISION_HINT": "f32"})
    except RuntimeError as exc:
        raise UnsupportedModelError(
            f"OpenVINO {openvino_version()} converts the model but cannot compile it for the CPU: "
            f"{_reason(exc)}" + _where(_op_names(str(exc)), source) + "; the device would fail the same way"
        ) from exc


def save_ir(
    job: ConvertJob, model: Any, name: str, *, fp16: bool = False, precision: Precision | None = None
) -> HostModel:
    """Save ``model`` as IR under the job's folder; the HostModel that runs it with the target's host plan
    (for ``precision``, default the job's)."""
    import openvino as ov

    folder = job.workdir / f"ir-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    xml = folder / MODEL_FILE
    ov.save_model(model, str(xml), compress_to_fp16=fp16)
    plan = job.target.family.host_plan(job.target, precision=precision or job.precision)
    return HostModel(xml, "openvino", plan)


def compiled_model(job: ConvertJob, host: HostModel, quantization: dict[str, Any] | None) -> CompiledModel:
    """The bundle's view of the IR at ``host.path``: model and weights files, the source's signature."""
    target: Target = job.target
    xml = Path(host.path)
    return CompiledModel(
        host=host,
        files=[BundleFile(MODEL_FILE, xml, "model"), BundleFile(WEIGHTS_FILE, xml.with_suffix(".bin"), "weights")],
        model_file=MODEL_FILE,
        inputs=list(job.model.inputs),
        outputs=list(job.model.outputs),
        runtime_version=target.family.runtime_version(target, opset=job.model.opset or 0),
        quantization=quantization,
    )


def host_config(execution: Mapping[str, Any], threads: int | None = None) -> dict[str, Any]:
    """``compile_model`` properties for running on this host as the plan says (precision pinned)."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": str(execution.get("inference_precision") or "f32")}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def latency_ms(
    model: HostModel, feed: Mapping[str, np.ndarray], *, threads: int = 1, budget_s: float = 1.0, min_runs: int = 5
) -> float:
    """Median milliseconds per inference on this host's CPU, precision pinned as the host plan says.

    A raw OpenVINO infer request (the backend's kernels, without its per-call signature checks, which
    would blur sub-millisecond timings), the latency hint, ``threads`` inference threads.
    """
    import openvino as ov

    config = {**host_config(model.execution, threads), "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(str(model.path), HOST_DEVICE, config)
    request = compiled.create_infer_request()
    feed = dict(feed)
    return median_ms(lambda: request.infer(feed), budget_s=budget_s, min_runs=min_runs)


def _name_ports(ports: Sequence[Any], specs: Sequence[TensorSpec], role: str, source: FloatModel) -> None:
    """Give each port the source's name for it. ONNX tensors keep their names through conversion; a TFLite
    model's ports carry tensor names (``serving_default_x:0``) while its signature says ``x``: matched by
    position, as the flatbuffer's subgraph lists them (LiteRT reports them in the same order)."""
    if all(any(spec.name in port.get_names() for port in ports) for spec in specs):
        return
    if len(ports) != len(specs):
        raise UnsupportedModelError(
            f"OpenVINO reads {len(ports)} {role}(s) from {source.path.name}, the source declares {len(specs)} "
            f"({', '.join(s.name for s in specs)})"
        )
    for port, spec in zip(ports, specs, strict=True):
        if spec.name not in port.get_names():
            port.get_tensor().add_names({spec.name})


def _frontend_failures() -> tuple[type[BaseException], ...]:
    import openvino as ov

    names = ("OpConversionFailure", "OpValidationFailure", "GeneralFailure", "NotImplementedFailure")
    return tuple(getattr(ov.frontend, n) for n in names if hasattr(ov.frontend, n))


_NOISE = re.compile(r"^(Exception from |Check '.*' failed at |FrontEnd API failed with |Traceback )")


def _reason(exc: BaseException) -> str:
    """OpenVINO's message without its source-location lines."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and not _NOISE.match(line)]
    return " ".join(kept) or type(exc).__name__


_OP_NAME = re.compile(r"(?:Operation name|node name|name)\s*[:=]\s*'?([^\s',]+)'?", re.IGNORECASE)
_NO_RULE = re.compile(r"No conversion rule found for operations:\s*(.+)")


def _op_names(message: str) -> list[str]:
    names = [m.group(1) for m in _OP_NAME.finditer(message)]
    for m in _NO_RULE.finditer(message):
        names.extend(n.strip() for n in m.group(1).split(",") if n.strip())
    return list(dict.fromkeys(names))


def _where(op_names: Sequence[str], source: FloatModel) -> str:
    """`` (ONNX node 'x', op If)`` for the OpenVINO op names in a message, where the source has them."""
    if not op_names:
        return ""
    if source.format != "onnx":
        return f" (OpenVINO op {', '.join(repr(n) for n in op_names)})"
    import onnx

    from edgepack.targets.onnxruntime_family import _all_nodes

    proto = onnx.load(str(source.path), load_external_data=False)
    nodes = _all_nodes(proto.graph)
    by_name = {n.name: n for n in nodes if n.name}
    by_output = {out: n for n in nodes for out in n.output}
    by_type = {f"{n.domain}.{n.op_type}" if n.domain else n.op_type: n for n in nodes}
    found = []
    for name in op_names:
        base = name.removesuffix("/WithoutBiases")
        node = by_name.get(base) or by_output.get(base) or by_type.get(base)
        if node is not None:
            found.append(f"ONNX node {node.name or '(unnamed)'!r}, op {node.op_type}")
        else:
            found.append(f"OpenVINO op {name!r}")
    return " (" + "; ".join(found) + ")"


CONVERTER = OpenVinoConverter()
