"""The OpenVINO family: Intel CPUs, integrated/discrete GPUs and NPUs.

Every target here ships an OpenVINO IR (``model.xml`` + ``model.bin``) converted by OpenVINO's own
converter from an ONNX or a TFLite model (``edgepack.compiler.openvino_convert``). What differs is the
device and the precision:

* ``intel-cpu`` — default int8: NNCF post-training quantization on the user's calibration data
  (``edgepack.compiler.openvino_quantize``), 7-bit weights (NNCF's overflow fix on every layer) so that
  CPUs without VNNI do not saturate; fp32 on request.
* ``intel-gpu``, ``intel-npu`` — default fp16 weights (the IR's weights compressed to f16, computed in
  f16 by the device); int8 on request; the GPU also fp32.

The manifest's ``execution`` is what the device's OpenVINO backend reads::

    {"precision": "int8", "device": "CPU", "inference_precision": "f32"}

``inference_precision`` is always pinned (``INFERENCE_PRECISION_HINT``): left to itself OpenVINO computes
the float parts in bf16 on CPUs that have it (AVX-512 BF16, AMX) and the self-test outputs the compiler
measured would not reproduce. CPU bundles pin f32 — the precision they were validated with on the build
host; GPU/NPU fp16 bundles pin f16. Where the planned device is missing (no GPU/NPU, or accelerators
disallowed) the backend falls back to the CPU with the same plan; a CPU without f16 arithmetic then runs
f32 (OpenVINO's choice, logged by the backend) — the build host's check, which is exactly that.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.targets.onnxruntime_family import _all_nodes  # one walker over ONNX subgraphs
from edgepack.targets.registry import Precision, Target, UnsupportedNode, register

log = logging.getLogger(__name__)

# OpenVINO's names for the precisions a bundle runs its float parts in.
_OV_PRECISION: dict[str, str] = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}
_HOST_PLAN: dict[str, Any] = {"device": "CPU", "inference_precision": "f32"}


@dataclass(frozen=True)
class OpenVinoFamily:
    """Op support, runtime versions and execution plans for OpenVINO targets."""

    name: str = "openvino"
    converter: str = "edgepack.compiler.openvino_convert:CONVERTER"

    def unsupported_nodes(self, target: Target, model: Any) -> list[UnsupportedNode]:
        """Nodes OpenVINO's ONNX frontend has no conversion rule for (it leaves them as framework nodes)."""
        import onnx
        import openvino as ov

        with tempfile.TemporaryDirectory(prefix="edgepack-ovcheck-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save(model, str(path))
            frontend = ov.frontend.FrontEndManager().load_by_framework("onnx")
            try:
                partial = frontend.convert_partially(frontend.load(str(path)))
            except RuntimeError as exc:  # not even partially convertible: the converter reports it
                log.info("OpenVINO cannot read the model partially: %s", exc)
                return []
        by_output = {out: node for node in _all_nodes(model.graph) for out in node.output}
        by_name = {node.name: node for node in _all_nodes(model.graph) if node.name}
        version = str(ov.__version__).split("-", 1)[0]
        found: list[UnsupportedNode] = []
        for op in partial.get_ordered_ops():
            if "FrameworkNode" not in op.get_type_name():
                continue
            name = op.get_friendly_name()
            node = by_name.get(name) or by_output.get(name)
            op_type = node.op_type if node is not None else op.get_type_name()
            domain = (node.domain or "") if node is not None else ""
            found.append(
                UnsupportedNode(
                    node=(node.name or name) if node is not None else name,
                    op_type=op_type,
                    domain=domain,
                    reason=f"OpenVINO {version} has no conversion rule for {domain + '.' if domain else ''}"
                    f"{op_type} (target {target.name})",
                )
            )
        return found

    def runtime_version(self, target: Target, *, opset: int) -> str:
        # IR v11 with standard opsets; the floor is the oldest release edgepack's backend supports.
        return f">={target.options.get('min_openvino', '2024.4')}"

    def host_plan(self, target: Target, *, precision: Precision) -> dict[str, Any]:
        return {"precision": precision, **_HOST_PLAN}

    def execution_plan(self, target: Target, *, precision: Precision, model_sha256: str) -> dict[str, Any]:
        device = str(target.options.get("device", "CPU"))
        plan: dict[str, Any] = {
            "precision": precision,
            "device": device,
            "inference_precision": inference_precision(target, precision),
        }
        if device != "CPU":
            plan["fallback_device"] = "CPU"
        return plan


def inference_precision(target: Target, precision: Precision) -> str:
    """What ``INFERENCE_PRECISION_HINT`` the device pins for a bundle of ``precision`` on ``target``.

    fp32 bundles compute in f32. fp16 bundles in f16. int8 bundles run their quantized ops in int8 and
    the rest in the target's float precision: f32 on the CPU (what the build host validated), f16 on a GPU
    or NPU (their native float path).
    """
    if precision == "int8":
        return str(target.options.get("int8_float_precision", "f32"))
    return _OV_PRECISION[precision]


FAMILY = OpenVinoFamily()

register(
    Target(
        name="intel-cpu",
        family=FAMILY,
        runtime="openvino",
        default_precision="int8",
        precisions=("int8", "fp32"),
        accelerator="Intel/x86 CPU (OpenVINO; AVX2/AVX-512/VNNI/AMX)",
        static_shapes=False,
        notes="OpenVINO IR; NNCF int8 (f32 for the float parts, pinned: no silent bf16); ONNX or TFLite in",
        aliases=("openvino", "openvino-cpu", "intel"),
        # NNCF's overflow fix on every layer (7-bit weights): int8 kernels of CPUs without VNNI (AVX2) sum
        # pairs of u8*s8 products in 16 bits and saturate; measured on the benchmark ResNet-50 on an AVX2
        # host, NNCF's default (first layer only) lost top-1 agreement, all layers kept it at no cost in
        # speed; on a VNNI host both are exact and equally fast (docs/compiler.md). A bundle does not know
        # its CPU, so it takes the setting safe on both: the same trade as the x86 target's reduce_range.
        options={
            "device": "CPU",
            "min_openvino": "2024.4",
            "int8_float_precision": "f32",
            "nncf_overflow_fix": "enable",
        },
    )
)
register(
    Target(
        name="intel-gpu",
        family=FAMILY,
        runtime="openvino",
        default_precision="fp16",
        precisions=("fp16", "int8", "fp32"),
        accelerator="Intel GPU (OpenVINO GPU plugin) → CPU",
        static_shapes=True,
        notes="OpenVINO IR with f16 weights, computed in f16; int8 (NNCF) on request",
        aliases=("openvino-gpu", "intel-igpu", "arc"),
        options={"device": "GPU", "min_openvino": "2024.4", "int8_float_precision": "f16"},
    )
)
register(
    Target(
        name="intel-npu",
        family=FAMILY,
        runtime="openvino",
        default_precision="fp16",
        precisions=("fp16", "int8"),
        accelerator="Intel NPU (Core Ultra; OpenVINO NPU plugin) → CPU",
        static_shapes=True,
        notes="OpenVINO IR with f16 weights; static shapes; int8 (NNCF) on request",
        aliases=("openvino-npu", "npu"),
        options={"device": "NPU", "min_openvino": "2024.4", "int8_float_precision": "f16"},
    )
)
