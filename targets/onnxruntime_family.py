"""The ONNX Runtime family: x86 CPUs, NVIDIA GPUs and Jetson boards.

Every target here ships an ONNX model that onnxruntime runs. What differs is the execution-provider plan
recorded in the manifest (``execution``), which the device's onnxruntime backend follows, keeping only the
providers its build has:

* ``x86`` — CPUExecutionProvider; default int8 (static QDQ, per-channel weights, u8 activations/s8
  weights with a 7-bit weight range — the combination measured fast *and* exact here).
* ``nvidia-gpu``, ``jetson-orin`` (alias ``jetson``), ``jetson-xavier``, ``jetson-nano`` — TensorRT first,
  then CUDA, then CPU. The TensorRT options carry the precision (``trt_fp16_enable``/``trt_int8_enable``),
  the workspace size, and engine and timing caches so the first boot builds the engine once and later
  boots reuse it. Default fp16 (model converted with fp32 inputs/outputs kept); int8 QDQ on request
  (not on the Nano, whose Maxwell GPU has no int8 path in TensorRT).

Cache paths are relative: the device's onnxruntime backend places them under its runtime cache folder.
They hold two placeholders the device fills in, ``{trt_version}`` and ``{gpu}`` (e.g. ``sm87``). The engine cache is keyed by model hash + TensorRT
version + GPU, the timing cache (shareable between models) by TensorRT version + GPU, so a TensorRT
upgrade or a different board never loads a stale engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgepack.targets.registry import Precision, Target, UnsupportedNode, register

# Op domains onnxruntime implements (besides functions the model defines itself).
_ORT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

# The oldest onnxruntime release that implements each ONNX opset (conservative).
_MIN_ORT_FOR_OPSET: tuple[tuple[int, str], ...] = (
    (15, "1.10"),
    (17, "1.13"),
    (18, "1.14"),
    (19, "1.15"),
    (20, "1.17"),
    (21, "1.18"),
    (22, "1.21"),
)

_GiB = 1 << 30


@dataclass(frozen=True)
class OnnxRuntimeFamily:
    """Op support, runtime versions and execution plans for onnxruntime targets."""

    name: str = "onnxruntime"
    converter: str = "edgepack.compiler.onnxruntime_convert:CONVERTER"

    def unsupported_nodes(self, target: Target, model: Any) -> list[UnsupportedNode]:
        import onnx

        local_functions = {(f.domain, f.name) for f in model.functions}
        found: list[UnsupportedNode] = []
        for node in _all_nodes(model.graph):
            domain = node.domain or ""
            if (domain, node.op_type) in local_functions:
                continue
            if domain not in _ORT_DOMAINS:
                found.append(
                    UnsupportedNode(
                        node=node.name or "(unnamed)",
                        op_type=node.op_type,
                        domain=domain,
                        reason=f"custom op domain {domain!r}: onnxruntime on {target.name} has no kernel for it",
                    )
                )
            elif domain in ("", "ai.onnx", "ai.onnx.ml") and not onnx.defs.has(node.op_type, domain):
                found.append(
                    UnsupportedNode(
                        node=node.name or "(unnamed)",
                        op_type=node.op_type,
                        domain=domain or "ai.onnx",
                        reason=f"{node.op_type!r} is not an ONNX operator",
                    )
                )
        return found

    def runtime_version(self, target: Target, *, opset: int) -> str:
        floor = str(target.options.get("min_onnxruntime", "1.18"))
        for max_opset, version in _MIN_ORT_FOR_OPSET:
            if opset <= max_opset:
                needed = version
                break
        else:
            needed = _MIN_ORT_FOR_OPSET[-1][1]
        return f">={max(floor, needed, key=_version_key)}"

    def host_plan(self, target: Target, *, precision: Precision) -> dict[str, Any]:
        plan = self.execution_plan(target, precision=precision, model_sha256="0" * 64)
        plan["providers"] = [p for p in plan["providers"] if p["name"] == "CPUExecutionProvider"]
        plan.pop("cache_key", None)
        return plan

    def execution_plan(self, target: Target, *, precision: Precision, model_sha256: str) -> dict[str, Any]:
        providers: list[dict[str, Any]] = []
        if target.options.get("tensorrt"):
            key = model_sha256[:16]
            providers.append(
                {
                    "name": "TensorrtExecutionProvider",
                    "options": {
                        "trt_fp16_enable": precision in ("fp16", "int8"),
                        "trt_int8_enable": precision == "int8",
                        "trt_max_workspace_size": int(target.options.get("workspace_bytes", _GiB)),
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": f"tensorrt/engines/{key}/{{trt_version}}/{{gpu}}",
                        "trt_timing_cache_enable": True,
                        "trt_timing_cache_path": "tensorrt/timing/{trt_version}/{gpu}",
                    },
                }
            )
            providers.append({"name": "CUDAExecutionProvider", "options": {}})
        providers.append({"name": "CPUExecutionProvider", "options": {}})
        plan: dict[str, Any] = {"precision": precision, "providers": providers}
        if target.options.get("tensorrt") and precision == "int8":
            # TensorRT runs the QDQ model as written (explicit quantization). Where onnxruntime runs nodes
            # itself (CUDA/CPU fallback), its "all"-level fusions would turn s8 Q/DQ pairs into u8s8 kernels
            # that saturate on CPUs without dot-product instructions (measured on an AVX2 host: 53 % top-1
            # agreement on the sample model); the "basic" level keeps Q/DQ exact. TensorRT is unaffected.
            plan["graph_optimization_level"] = "basic"
        if target.options.get("tensorrt"):
            plan["cache_key"] = {
                "model_sha256": model_sha256,
                "placeholders": ["trt_version", "gpu"],
            }
        return plan


def _all_nodes(graph: Any) -> list[Any]:
    """Every node, including those in subgraphs (If/Loop/Scan bodies)."""
    import onnx

    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes.extend(_all_nodes(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    nodes.extend(_all_nodes(sub))
    return nodes


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


FAMILY = OnnxRuntimeFamily()

# int8 settings (compiler.quantize_ort.Int8Settings fields), measured: scripts/bench/bench_ort_int8.py.
# x86: u8 activations, s8 weights, 7-bit weight range. Without reduce_range the u8s8 kernels of CPUs
# without VNNI (AVX2) saturate 16-bit sums: ResNet-50 top-1 agreement fell to 65-93 %; with it 100 %,
# at the same speed. With VNNI both are exact and equally fast (3.5x over fp32); an x86 bundle does not
# know which x86 it will meet, so it takes the setting that is right on both.
_CPU_INT8 = {
    "activation_type": "uint8",
    "weight_type": "int8",
    "per_channel": True,
    "activation_symmetric": False,
    "reduce_range": True,
}
_TRT_INT8 = {"activation_type": "int8", "weight_type": "int8", "per_channel": True, "activation_symmetric": True}

_GPU_PRECISIONS: tuple[Precision, ...] = ("fp16", "int8", "fp32")

register(
    Target(
        name="x86",
        family=FAMILY,
        runtime="onnxruntime",
        default_precision="int8",
        precisions=("int8", "fp32"),
        accelerator="CPU (AVX2/AVX-512/VNNI)",
        static_shapes=False,
        notes="static QDQ int8: u8 activations, per-channel s8 (7-bit) weights; dynamic int8 where measured faster",
        aliases=("x86-64", "x86_64", "amd64", "cpu"),
        options={"min_onnxruntime": "1.18", "int8": _CPU_INT8},
    )
)
register(
    Target(
        name="nvidia-gpu",
        family=FAMILY,
        runtime="onnxruntime",
        default_precision="fp16",
        precisions=_GPU_PRECISIONS,
        accelerator="NVIDIA GPU: TensorRT → CUDA → CPU",
        static_shapes=True,
        notes="onnxruntime-gpu; fp16 with fp32 I/O; int8 QDQ on request; engine cache per model+TRT+GPU",
        aliases=("cuda", "gpu"),
        options={"min_onnxruntime": "1.18", "tensorrt": True, "workspace_bytes": 4 * _GiB, "int8": _TRT_INT8},
    )
)
register(
    Target(
        name="jetson-orin",
        family=FAMILY,
        runtime="onnxruntime",
        default_precision="fp16",
        precisions=_GPU_PRECISIONS,
        accelerator="Jetson Orin (Ampere): TensorRT → CUDA → CPU",
        static_shapes=True,
        notes="JetPack 5/6; `jetson` names this, the current generation",
        aliases=("jetson", "orin", "jetson-agx-orin", "jetson-orin-nano"),
        options={"min_onnxruntime": "1.16", "tensorrt": True, "workspace_bytes": 2 * _GiB, "int8": _TRT_INT8},
    )
)
register(
    Target(
        name="jetson-xavier",
        family=FAMILY,
        runtime="onnxruntime",
        default_precision="fp16",
        precisions=_GPU_PRECISIONS,
        accelerator="Jetson Xavier (Volta): TensorRT → CUDA → CPU",
        static_shapes=True,
        notes="JetPack 5; AGX and NX",
        aliases=("xavier", "jetson-xavier-nx", "jetson-agx-xavier"),
        options={"min_onnxruntime": "1.16", "tensorrt": True, "workspace_bytes": 1 * _GiB, "int8": _TRT_INT8},
    )
)
register(
    Target(
        name="jetson-nano",
        family=FAMILY,
        runtime="onnxruntime",
        default_precision="fp16",
        precisions=("fp16", "fp32"),
        accelerator="Jetson Nano (Maxwell): TensorRT → CUDA → CPU",
        static_shapes=True,
        notes="JetPack 4.6; no int8 (Maxwell); 4 GB shared memory: small workspace",
        aliases=("nano",),
        options={"min_onnxruntime": "1.10", "tensorrt": True, "workspace_bytes": _GiB // 2},
    )
)
