"""The LiteRT family: ARM CPUs running ``.tflite`` models with LiteRT (``ai-edge-litert``) and XNNPACK.

Targets: ``arm64`` (any ARMv8-A Linux board), ``rpi4`` (Raspberry Pi 4, Cortex-A72) and ``rpi5``
(Raspberry Pi 5, Cortex-A76). Default int8, full-integer where the model allows it: XNNPACK's int8
kernels are what makes a Pi fast. fp32 is the fallback (and on request).

The compiler side is :mod:`edgepack.compiler.litert_convert`: ONNX models go through onnx2tf (in its
managed toolchain) to float TFLite, then ai-edge-quantizer makes the int8 model; a ``.tflite`` model is
taken as given and quantized if asked. Shapes are static (onnx2tf converts best with fixed shapes; a
dynamic batch dimension becomes 1). onnx2tf makes channel-first tensors channel-last: the manifest records
both layouts and the device's LiteRT backend transposes at the edges, so clients keep sending NCHW.

What this module knows without the compiler: op support at the level of the ONNX graph (onnx2tf
implements the standard ``ai.onnx`` operators; an op of another domain is looked up by name only, which
would convert it with the wrong semantics, so it is refused here, naming node and op), the manifest's
execution plan, and the runtime versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgepack.targets.registry import Precision, Target, UnsupportedNode, register

_STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
# The agent's `agent-litert` extra requires ai-edge-litert>=1.2; models are validated on this host with
# the installed release (see the manifest's toolchain).
_MIN_LITERT = "1.2"


@dataclass(frozen=True)
class LiteRtFamily:
    """Op support, runtime versions and execution plans for LiteRT targets."""

    name: str = "litert"
    converter: str = "edgepack.compiler.litert_convert:CONVERTER"

    def unsupported_nodes(self, target: Target, model: Any) -> list[UnsupportedNode]:
        local_functions = {(f.domain, f.name) for f in getattr(model, "functions", [])}
        found = []
        for node in model.graph.node:
            domain = node.domain or ""
            if domain in _STANDARD_DOMAINS or (domain, node.op_type) in local_functions:
                continue
            found.append(
                UnsupportedNode(
                    node=node.name or "(unnamed)",
                    op_type=node.op_type,
                    domain=domain,
                    reason=(
                        f"op of domain {domain!r}: the TFLite converter (onnx2tf) implements standard ONNX "
                        f"operators only, so {target.name} cannot run it"
                    ),
                )
            )
        return found

    def runtime_version(self, target: Target, *, opset: int) -> str:
        return f">={target.options.get('min_litert', _MIN_LITERT)}"

    def execution_plan(self, target: Target, *, precision: Precision, model_sha256: str) -> dict[str, Any]:
        return {
            "precision": precision,
            "delegate": "xnnpack",
            "threads": int(target.options.get("threads", 4)),
            "cpu": target.options.get("cpu", "armv8-a"),
        }

    def host_plan(self, target: Target, *, precision: Precision) -> dict[str, Any]:
        # LiteRT with XNNPACK on this host's CPU computes what the device computes (same kernels, same
        # int8 arithmetic); only the thread count is the host's.
        return {"precision": precision, "delegate": "xnnpack"}


FAMILY = LiteRtFamily()

_PRECISIONS: tuple[Precision, ...] = ("int8", "fp32")

register(
    Target(
        name="arm64",
        family=FAMILY,
        runtime="litert",
        default_precision="int8",
        precisions=_PRECISIONS,
        accelerator="ARMv8-A CPU (NEON) via XNNPACK",
        static_shapes=True,
        notes="LiteRT int8 (ai-edge-quantizer, full-integer where possible); any 64-bit ARM Linux board",
        aliases=("aarch64", "arm"),
        options={"threads": 4, "cpu": "armv8-a"},
    )
)
register(
    Target(
        name="rpi4",
        family=FAMILY,
        runtime="litert",
        default_precision="int8",
        precisions=_PRECISIONS,
        accelerator="Raspberry Pi 4: 4x Cortex-A72 via XNNPACK",
        static_shapes=True,
        notes="LiteRT int8; ARMv8.0 (no dot-product instructions); 64-bit OS",
        aliases=("raspberry-pi-4", "pi4"),
        options={"threads": 4, "cpu": "cortex-a72"},
    )
)
register(
    Target(
        name="rpi5",
        family=FAMILY,
        runtime="litert",
        default_precision="int8",
        precisions=_PRECISIONS,
        accelerator="Raspberry Pi 5: 4x Cortex-A76 via XNNPACK",
        static_shapes=True,
        notes="LiteRT int8; ARMv8.2 with dot-product instructions (XNNPACK's fast int8 path)",
        aliases=("raspberry-pi-5", "pi5"),
        options={"threads": 4, "cpu": "cortex-a76"},
    )
)
