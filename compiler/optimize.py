"""Pipeline step 2: simplify the graph with onnxslim, and keep the result only if it still computes the same.

Why onnxslim and not onnxruntime's offline optimizer: measured on the sample CNN, the ResNet-50 and a
Conv+BatchNorm+shape-chain graph, both ran without error and gave identical outputs, and at onnxruntime's
portable "basic" level both did the same work (Conv+BN folding, constant and shape-chain folding). But
onnxruntime's optimizer is a by-product of creating a session (``optimized_model_filepath``), and its
higher levels write provider-specific ops (``com.microsoft`` FusedConv, NCHWc) that a TensorRT device must
not get; onnxslim is a tool made for offline ONNX-to-ONNX simplification that writes standard ONNX only.

The result is checked on real samples: if onnxslim fails on a graph, or its output differs from the
original's by more than float rounding, the original is kept and the report says why — an optimizer
is never a reason to fail a compile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from edgepack.compiler.runner import Feeds, raw_session

log = logging.getLogger(__name__)

_RTOL = 1e-3  # relative to the output's scale: fusions reorder float sums, nothing more


@dataclass(frozen=True)
class OptimizeResult:
    proto: onnx.ModelProto
    tool: str  # "onnxslim <version>" or "none"
    nodes_before: int
    nodes_after: int
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "tool": self.tool,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            **({"note": self.note} if self.note else {}),
        }


def optimize(proto: onnx.ModelProto, feeds: Feeds) -> OptimizeResult:
    """Simplify ``proto``; ``feeds`` (a few real samples) check that the outputs did not change."""
    import onnxslim

    before = len(proto.graph.node)
    try:
        slim = onnxslim.slim(_copy(proto), model_check=False)
    except Exception as exc:  # onnxslim raises anything on graphs it cannot handle: keep the original, say so
        return _unchanged(proto, f"onnxslim failed ({type(exc).__name__}: {exc}); graph left as it was")
    if not isinstance(slim, onnx.ModelProto):
        return _unchanged(proto, "onnxslim returned no model; graph left as it was")
    del slim.metadata_props[:]
    slim.metadata_props.extend(proto.metadata_props)
    try:
        onnx.checker.check_model(slim)
    except onnx.checker.ValidationError as exc:
        return _unchanged(proto, f"onnxslim wrote an invalid graph ({exc}); graph left as it was")
    problem = _differs(proto, slim, feeds)
    if problem:
        return _unchanged(proto, f"onnxslim changed the outputs ({problem}); graph left as it was")
    after = len(slim.graph.node)
    log.info("onnxslim: %d -> %d nodes", before, after)
    return OptimizeResult(slim, f"onnxslim {onnxslim.__version__}", before, after)


def _differs(original: onnx.ModelProto, slim: onnx.ModelProto, feeds: Feeds) -> str:
    a = raw_session(original.SerializeToString())
    b = raw_session(slim.SerializeToString())
    names = [o.name for o in a.get_outputs()]
    if sorted(names) != sorted(o.name for o in b.get_outputs()):
        return "the outputs are not the same tensors"
    for feed in list(feeds)[:4]:
        for name, x, y in zip(names, a.run(names, dict(feed)), b.run(names, dict(feed)), strict=True):
            x, y = np.asarray(x), np.asarray(y)
            if x.shape != y.shape:
                return f"output {name!r} changed shape {x.shape} -> {y.shape}"
            if x.dtype.kind == "f":
                scale = float(np.max(np.abs(x))) or 1.0
                diff = float(np.max(np.abs(x.astype(np.float64) - y))) if x.size else 0.0
                if diff > _RTOL * scale:
                    return f"output {name!r} max |diff| {diff:.3g} at scale {scale:.3g}"
            elif not np.array_equal(x, y):
                return f"output {name!r} differs"
    return ""


def _unchanged(proto: onnx.ModelProto, note: str) -> OptimizeResult:
    log.warning("%s", note)
    n = len(proto.graph.node)
    return OptimizeResult(proto, "none", n, n, note)


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy
