"""Pipeline step 1: load an ONNX model, check it, fix its shapes for the target, infer the rest.

What it guarantees to the later steps: the graph passes ``onnx.checker``, every op is one the target's
runtime can run, every input has the shape the user fixed with ``--input-shape`` (and, on a target that
needs static shapes, no dynamic dimension is left), and shape inference has run over the whole graph.

Errors say what to do: not an ONNX file (:class:`ModelLoadError`), an invalid graph (the checker's
message), an op the target cannot run (:class:`UnsupportedModelError` naming node and op), a dynamic
dimension on a static-shape target (naming the input and the ``--input-shape`` flag that fixes it).

On a static-shape target a dynamic *leading* (batch) dimension is fixed to 1 without being asked — the
edge default — and the result says so; any other dynamic dimension needs the flag.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from edgepack.errors import ConfigError, ModelLoadError, UnsupportedModelError
from edgepack.manifest import TensorSpec
from edgepack.targets.registry import Target

log = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")
# The oldest default-domain opset onnxruntime (and so the reference outputs) still loads.
MIN_OPSET = 7
_FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
)


@dataclass
class SourceModel:
    """A checked, shape-inferred model and what the rest of the pipeline needs to know about it."""

    path: Path
    proto: onnx.ModelProto
    sha256: str
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict[str, str]
    fixed_shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def name(self) -> str | None:
        return self.metadata.get("name") or (self.proto.graph.name or None)


def parse_input_shapes(values: Sequence[str]) -> dict[str, list[int]]:
    """Parse ``--input-shape NAME=1,3,224,224`` values into {name: dims}."""
    shapes: dict[str, list[int]] = {}
    for value in values:
        name, sep, dims = value.partition("=")
        try:
            parsed = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            parsed = []
        if not sep or not name.strip() or not parsed or any(d <= 0 for d in parsed):
            raise ConfigError(f"--input-shape {value!r}: expected NAME=D1,D2,... with positive integers")
        shapes[name.strip()] = parsed
    return shapes


def load_model(path: Path, target: Target, input_shapes: Mapping[str, Sequence[int]] | None = None) -> SourceModel:
    """Load ``path`` and make it ready for ``target``; see the module docstring for the checks."""
    path = Path(path)
    data = _read(path)
    proto = _parse(path, data)
    opset = _opset(path, proto)
    _check_references(path, proto)
    _clear_negative_dims(proto.graph)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX graph: {_first_line(exc)}") from exc
    _check_input_dims(path, proto)
    _check_finite_weights(path, proto)
    _check_ops(proto, target)
    fixed = _fix_shapes(proto, target, dict(input_shapes or {}))
    proto = _infer_shapes(path, proto)
    if fixed:
        from onnxruntime.tools.onnx_model_utils import fix_output_shapes

        try:
            fix_output_shapes(proto)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            log.warning("%s: output shapes left as exported (%s)", path.name, _first_line(exc))
    inputs = tensor_specs(proto, "input")
    outputs = tensor_specs(proto, "output")
    metadata = {p.key: p.value for p in proto.metadata_props}
    log.info("loaded %s: opset %d, inputs %s", path.name, opset, [(i.name, i.shape) for i in inputs])
    return SourceModel(
        path=path,
        proto=proto,
        sha256=hashlib.sha256(data).hexdigest(),
        opset=opset,
        inputs=inputs,
        outputs=outputs,
        metadata=metadata,
        fixed_shapes=fixed,
    )


def _infer_shapes(path: Path, proto: onnx.ModelProto) -> onnx.ModelProto:
    """Strict shape inference; where onnx's inference cannot follow an op strictly, the lenient pass is
    kept (the checker has passed, and onnxruntime itself runs the model in the later steps)."""
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        strict_error = _first_line(exc)
    try:
        lenient = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"{path}: shape inference failed: {_first_line(exc)}") from exc
    log.warning("%s: strict shape inference failed (%s); using what it could infer", path.name, strict_error)
    return lenient


def tensor_specs(proto: onnx.ModelProto, kind: str) -> list[TensorSpec]:
    """The graph's real inputs (initializers excluded) or outputs as TensorSpecs."""
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    values = graph.input if kind == "input" else graph.output
    specs = []
    for value in values:
        if kind == "input" and value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise UnsupportedModelError(f"{kind} {value.name!r} is not a tensor (sequences and maps are not supported)")
        dims: list[int | str] = []
        for i, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value >= 0:
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or f"{value.name}_dim{i}")
        specs.append(TensorSpec(name=value.name, dtype=_dtype_name(tensor_type.elem_type), shape=dims))
    return specs


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ModelLoadError(f"model file {path} does not exist") from None
    except IsADirectoryError:
        raise ModelLoadError(f"{path} is a folder; give the path of an .onnx file") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _parse(path: Path, data: bytes) -> onnx.ModelProto:
    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path} is not an ONNX file (it does not parse as an ONNX ModelProto)") from exc
    if proto.ir_version <= 0 or not proto.graph.node or not proto.opset_import:
        raise ModelLoadError(
            f"{path} is not an ONNX model: it has no IR version, graph nodes or opset "
            "(is it another format, e.g. TFLite, a PyTorch checkpoint or a zip?)"
        )
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot load its external weight files: {exc}") from exc
    return proto


def _opset(path: Path, proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            version = int(imp.version)
            newest = onnx.defs.onnx_opset_version()
            if version < MIN_OPSET:
                raise ModelLoadError(
                    f"{path} uses ONNX opset {version}; the compiler and the runtimes take opset {MIN_OPSET} to "
                    f"{newest}: re-export the model with a newer opset (13 or later is best for int8), or convert it "
                    "with onnx.version_converter"
                )
            if version > newest:
                raise ModelLoadError(
                    f"{path} uses ONNX opset {version}, newer than any this compiler knows (onnx {onnx.__version__} "
                    f"knows up to {newest}); re-export the model with opset {newest} or older"
                )
            return version
    raise ModelLoadError(f"{path} imports no default ONNX opset; it is not a standard ONNX model")


def _check_references(path: Path, proto: onnx.ModelProto) -> None:
    """Every tensor a top-level node reads exists: a graph input, an initializer or an earlier node's output.

    The checker finds this too, but says "must be topologically sorted"; a missing initializer (a weight
    file saved without its weights, a hand-edited graph) deserves its own message."""
    graph = proto.graph
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    known |= {t.values.name for t in graph.sparse_initializer}
    produced = {out for node in graph.node for out in node.output if out}
    for node in graph.node:
        for name in node.input:
            if name and name not in known and name not in produced:
                raise ModelLoadError(
                    f"{path}: node {node.name or '(unnamed)'!r} (op {node.op_type}) reads tensor {name!r}, which no "
                    "graph input, initializer or node provides (a missing weight?); re-export the model with its "
                    "weights (onnx.save with save_as_external_data=False, or keep the external data files beside it)"
                )
        known.update(o for o in node.output if o)


def _clear_negative_dims(graph: onnx.GraphProto) -> None:
    """A ``dim_value`` below 0 (``-1``, how some exporters write "dynamic") is not valid ONNX; it becomes an
    unknown dimension, as onnxruntime's own shape tools treat it — else shape inference reports a
    mismatch between ``-1`` and the size it infers."""
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if not value.type.HasField("tensor_type"):
            continue
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()


def _check_input_dims(path: Path, proto: onnx.ModelProto) -> None:
    """A graph input with a dimension of 0 holds no data: no sample can fit it."""
    initializers = {t.name for t in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        zero = [i for i, d in enumerate(dims) if d.HasField("dim_value") and d.dim_value == 0]
        if zero:
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise ModelLoadError(
                f"{path}: input {value.name!r} has a dimension of 0 at position(s) {', '.join(map(str, zero))} "
                f"(shape {shape}), so no input can fit it; re-export the model with the real size there, or a "
                "dynamic dimension fixed with --input-shape"
            )


def _check_finite_weights(path: Path, proto: onnx.ModelProto) -> None:
    """Weights holding NaN or infinity make every output NaN; say which initializer and who reads it."""
    from onnx import numpy_helper

    readers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name or node.op_type)
    for tensor in proto.graph.initializer:
        if tensor.data_type not in _FLOAT_TYPES:
            continue
        try:
            array = numpy_helper.to_array(tensor)
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(f"{path}: initializer {tensor.name!r} cannot be read: {exc}") from exc
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            nans = int(np.count_nonzero(np.isnan(array)))
            who = ", ".join(repr(r) for r in readers.get(tensor.name, [])[:3]) or "no node"
            raise ModelLoadError(
                f"{path}: initializer {tensor.name!r} (read by {who}) holds {bad} non-finite value(s) "
                f"({nans} NaN, {bad - nans} infinite) of {array.size}; the model's outputs would be NaN. "
                "The training diverged or the export is broken: export again from a good checkpoint"
            )


def _check_ops(proto: onnx.ModelProto, target: Target) -> None:
    bad = target.family.unsupported_nodes(target, proto)
    if not bad:
        return
    listed = "; ".join(
        f"node {b.node!r} (op {b.domain + '::' if b.domain else ''}{b.op_type}): {b.reason}" for b in bad[:5]
    )
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    raise UnsupportedModelError(
        f"target {target.name!r} ({target.runtime}) cannot run {len(bad)} node(s): {listed}{more}"
    )


def _fix_shapes(proto: onnx.ModelProto, target: Target, requested: dict[str, list[int]]) -> dict[str, list[int]]:
    graph = proto.graph
    specs = {s.name: s for s in tensor_specs(proto, "input")}
    unknown = [name for name in requested if name not in specs]
    if unknown:
        raise ConfigError(
            f"--input-shape names {', '.join(repr(u) for u in unknown)}, which the model does not have; "
            f"its inputs are {', '.join(f'{s.name} {s.shape}' for s in specs.values())}"
        )
    fixed: dict[str, list[int]] = {}
    for name, dims in requested.items():
        spec = specs[name]
        if len(dims) != len(spec.shape):
            raise ConfigError(
                f"--input-shape {name}={','.join(map(str, dims))}: input {name!r} has rank {len(spec.shape)} "
                f"(shape {spec.shape}), not {len(dims)}"
            )
        for i, (want, have) in enumerate(zip(dims, spec.shape, strict=True)):
            if isinstance(have, int) and have != want:
                raise ConfigError(
                    f"--input-shape {name}: dimension {i} of input {name!r} is fixed at {have} in the model, not {want}"
                )
        set_input_dims(graph, name, list(dims))
        fixed[name] = list(dims)
    if target.static_shapes:
        for spec in tensor_specs(proto, "input"):
            if spec.is_static:
                continue
            dims = list(spec.shape)
            if not isinstance(dims[0], int) and all(isinstance(d, int) for d in dims[1:]):
                dims[0] = 1
                log.info("input %r: dynamic batch dimension fixed to 1 for target %s", spec.name, target.name)
                set_input_dims(graph, spec.name, dims)  # type: ignore[arg-type]
                fixed[spec.name] = dims  # type: ignore[assignment]
                continue
            dynamic = [f"{i} ({d})" for i, d in enumerate(spec.shape) if not isinstance(d, int)]
            example = ",".join(str(d) if isinstance(d, int) else "N" for d in spec.shape)
            raise UnsupportedModelError(
                f"input {spec.name!r} has dynamic dimension(s) {', '.join(dynamic)} (shape {spec.shape}), and "
                f"target {target.name!r} needs static shapes; fix them with "
                f"--input-shape {spec.name}={example} (N: the size to build for)"
            )
    return fixed


def set_input_dims(graph: onnx.GraphProto, name: str, dims: Sequence[int]) -> None:
    """Give graph input ``name`` the static shape ``dims``, each position on its own.

    Not onnxruntime's ``make_input_shape_fixed``: it replaces a ``dim_param`` by name throughout the
    graph, so an input ``[-1, 3, '?', '?']`` (PaddlePaddle's exports name every unknown dimension ``?``)
    cannot become ``[1, 3, 48, 192]`` — the first ``?`` fixed to 48 makes the second one 48 too, and it
    fails ("Can't replace existing fixed size of 48 with 192"). Here only the input's own dimensions change;
    shape inference (run next by :func:`load_model`) carries the sizes through the graph.
    """
    value = next(v for v in graph.input if v.name == name)
    shape = value.type.tensor_type.shape
    for dim, size in zip(shape.dim, dims, strict=True):
        dim.Clear()
        dim.dim_value = int(size)


def _dtype_name(elem_type: int) -> str:
    if elem_type == onnx.TensorProto.BFLOAT16:
        return "bfloat16"
    if elem_type == onnx.TensorProto.STRING:
        return "string"
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, ValueError) as exc:
        raise UnsupportedModelError(f"tensor element type {elem_type} is not supported") from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
