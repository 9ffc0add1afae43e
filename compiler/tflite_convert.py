"""ONNX → float TFLite through onnx2tf in the managed ``tflite`` toolchain, with names and layouts mapped back.

onnx2tf runs in its own environment (:mod:`edgepack.compiler.toolchain`) as a subprocess
(:mod:`edgepack.compiler.onnx2tf_driver`). Around it this module takes care of what onnx2tf does not:

* **its input is a copy**: onnx2tf rewrites the file it is given (onnxsim, op renaming) in place;
* **offline**: onnx2tf downloads a sample-image file (``calibration_image_sample_data_20x128x128x3_float32.npy``)
  into its working directory whenever every input is a 3-channel image, to drive its internal checks. The
  converter writes that file itself, from the user's calibration samples (real data is a better probe than
  stock photos anyway), and runs onnx2tf with the network blocked (HTTP(S) proxies pointed at a closed
  port), so a conversion behaves the same online and offline;
* **names and order**: onnx2tf renames tensors (``input:0`` → ``serving_default_input__0:0``, outputs
  ``PartitionedCall:0``) and may reorder outputs. Inputs are matched to the source model by name (as
  onnx2tf sanitizes it), else by position; outputs by *value*: one real sample is run through the ONNX
  model (onnxruntime) and the TFLite model (LiteRT), and each source output takes the TFLite output that
  reproduces it. The flatbuffer is then rewritten with the source names, in the source order
  (:func:`edgepack.compiler.tflite_graph.rewrite_io`);
* **layout**: onnx2tf turns channel-first tensors (NCW/NCHW/NCDHW) into channel-last. Each input and
  output spec records ``layout`` (the source's) and ``native_layout`` (the TFLite model's) where they
  differ, so the device's LiteRT backend takes and returns the source layout and clients do not change;
* **errors**: a node onnx2tf cannot convert is reported by name and op type
  (:class:`~edgepack.errors.UnsupportedModelError`); other failures raise
  :class:`~edgepack.errors.ConversionError` pointing at the log, which is kept for the compile report.

Usage::

    converted = convert_onnx(Path("fp32.onnx"), workdir, inputs=specs_in, outputs=specs_out, samples=feeds)
    converted.path, converted.inputs[0].layout, converted.inputs[0].native_layout   # ..., "NCHW", "NHWC"
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgepack.compiler.gelu_fusion import fuse_exact_gelu
from edgepack.compiler.node_errors import name_nodes
from edgepack.compiler.recurrent_unroll import unroll_lstms, why_not_unrolled
from edgepack.compiler.tflite_graph import TfliteTensor, describe, rewrite_io
from edgepack.compiler.toolchain import Toolchain, ensure_toolchain
from edgepack.errors import ConversionError, UnsupportedModelError
from edgepack.manifest import TensorSpec
from edgepack.runtimes.tensors import permute_shape, transpose_layout
from edgepack.versions import installed_version

log = logging.getLogger(__name__)

DRIVER = Path(__file__).with_name("onnx2tf_driver.py")
SAMPLE_IMAGE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
LOG_NAME = "onnx2tf.log"
# channel-first layout of the source -> channel-last layout onnx2tf produces, by rank
CHANNEL_LAYOUTS: dict[int, tuple[str, str]] = {3: ("NCW", "NWC"), 4: ("NCHW", "NHWC"), 5: ("NCDHW", "NDHWC")}
# The newest ONNX IR version the toolchain's onnx/onnxruntime read (onnxruntime 1.23: 11). A model saved by a
# newer onnx (IR 12+) makes onnxsim fail and onnx2tf convert without its shape checks — silently wrong.
_TOOLCHAIN_MAX_IR = 11
# outputs must reproduce the ONNX model this closely (relative to the output's scale) to be matched
_MATCH_TOLERANCE = 1e-3
_BLOCKED_NETWORK = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "",
    "no_proxy": "",
}


@dataclass
class ConvertedModel:
    """A float TFLite model whose signature is the source model's, and how the conversion went."""

    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    log_path: Path
    seconds: float
    peak_rss_mb: float | None
    toolchain: dict[str, str]
    ops: dict[str, int] = field(default_factory=dict)
    max_abs_diff: float = 0.0  # on the probe sample, against onnxruntime
    int8_path: Path | None = None  # onnx2tf's own full-integer model, when asked for

    def report(self) -> dict[str, Any]:
        return {
            "converter": f"onnx2tf {self.toolchain.get('onnx2tf', '?')}",
            "seconds": round(self.seconds, 2),
            "peak_rss_mb": self.peak_rss_mb,
            "ops": self.ops,
            "probe_max_abs_diff": self.max_abs_diff,
            "log": self.log_path.name,
        }


_TF_SCOPE = re.compile(r"[^A-Za-z0-9_.\\/>-]")


def _tf_scope_names(proto: onnx.ModelProto) -> None:
    """Node names TensorFlow takes as scope names (``^[A-Za-z0-9_.\\/>-]*$``): onnx2tf names a layer after its
    node, and onnxslim names fused nodes ``Softmax@0``, which Keras refuses ("not a valid scope name"; the
    OCR direction classifier of rapidocr failed so). Other characters become ``_``, kept unique; tensor
    names (which the int8 search works with) do not change."""
    used = {n.name for n in proto.graph.node}
    for node in proto.graph.node:
        if not _TF_SCOPE.search(node.name):
            continue
        name = _TF_SCOPE.sub("_", node.name)
        while name in used:
            name += "_"
        used.add(name)
        node.name = name


def convert_onnx(
    onnx_path: Path,
    workdir: Path,
    *,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    samples: Sequence[Mapping[str, np.ndarray]] = (),
    toolchain: Toolchain | None = None,
    int8_calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
    on_progress: Callable[[str], None] | None = None,
    timeout_s: float = 3600.0,
) -> ConvertedModel:
    """Convert ``onnx_path`` (static shapes, named like ``inputs``/``outputs``) to a float TFLite model.

    ``samples`` are real input feeds in the source layout (the first probes the name/order mapping; up to
    20 image samples replace onnx2tf's downloaded ones). ``int8_calibration`` also makes onnx2tf's own
    full-integer model (for comparison; the compiler quantizes with ai-edge-quantizer).
    """
    chain = toolchain or ensure_toolchain("tflite", on_progress=on_progress)
    work = Path(workdir) / "onnx2tf"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    proto = onnx.load(str(onnx_path))
    name_nodes(proto)  # every node named: onnx2tf reports a failing node by name
    feeds = [dict(s) for s in samples] or [_random_feed(inputs)]
    proto, gelus = fuse_exact_gelu(proto, check_feed=feeds[0])  # TFLite's GELU op, not an int8-hostile pseudo Erf
    if gelus and on_progress:
        on_progress(f"{gelus} GELU subgraph(s) fused for TFLite's GELU op")
    proto, lstms = unroll_lstms(proto, check_feed=feeds[0])  # onnx2tf's Keras LSTM refuses state in/out
    if lstms and on_progress:
        on_progress(f"{len(lstms)} LSTM node(s) unrolled into MatMul steps for onnx2tf")
    _tf_scope_names(proto)
    _fit_ir_version(proto)
    model_copy = work / "model.onnx"
    onnx.save(proto, str(model_copy))
    _write_sample_images(work, inputs, feeds)

    request: dict[str, Any] = {
        "onnx": str(model_copy),
        "output_dir": str(work / "out"),
        "result": str(work / "result.json"),
    }
    if lstms:
        # an unrolled LSTM reads its state as [layers, batch, hidden]: onnx2tf must not make it channel-last
        request["keep_layout_inputs"] = [spec.name for spec in inputs if len(spec.shape) == 3]
    if int8_calibration:
        request["int8_calibration"] = _calibration_files(work, inputs, int8_calibration)
    (work / "request.json").write_text(json.dumps(request, indent=2))
    log_path = Path(workdir) / LOG_NAME
    if on_progress:
        on_progress(f"onnx2tf {chain.versions.get('onnx2tf', '')} (log: {log_path.name})")
    env = {**_BLOCKED_NETWORK, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1", "NO_COLOR": "1"}
    run = chain.run(
        [str(DRIVER), str(work / "request.json")], cwd=work, log_path=log_path, env=env, timeout_s=timeout_s
    )
    result = _read_result(work / "result.json", run.returncode, log_path, onnx_path)
    if not result.get("ok"):
        raise _conversion_error(result, proto, _keep_log(log_path, onnx_path))
    produced = work / "out" / "model_float32.tflite"
    if not produced.is_file():
        raise ConversionError(f"onnx2tf reported success but wrote no {produced.name}; see {log_path}")

    mapping = _map_io(onnx_path, produced, list(inputs), list(outputs), feeds[0])
    final = Path(workdir) / "model_float32.tflite"
    rewrite_io(
        produced,
        final,
        input_names={m.tensor.index: m.spec.name for m in mapping.inputs},
        output_names={m.tensor.index: m.spec.name for m in mapping.outputs},
        input_order=[m.tensor.index for m in mapping.inputs],
        output_order=[m.tensor.index for m in mapping.outputs],
    )
    int8_path = None
    if int8_calibration:
        int8_path = _int8_output(work, produced, final, mapping)
    info = describe(final)
    peak = max(result.get("peak_rss_mb") or 0.0, result.get("peak_rss_children_mb") or 0.0) or None
    log.info("onnx2tf converted %s in %.1f s (peak %.0f MB)", onnx_path.name, run.seconds, peak or 0)
    return ConvertedModel(
        path=final,
        inputs=[m.spec_out() for m in mapping.inputs],
        outputs=[m.spec_out() for m in mapping.outputs],
        log_path=log_path,
        seconds=float(result.get("seconds") or run.seconds),
        peak_rss_mb=peak,
        toolchain={"onnx2tf": result.get("onnx2tf", "?"), **chain.key_versions()},
        ops=info.op_counts(),
        max_abs_diff=mapping.max_abs_diff,
        int8_path=int8_path,
    )


# --- mapping names, order and layout back to the source ----------------------------------------------


@dataclass(frozen=True)
class _Match:
    spec: TensorSpec  # the source model's
    tensor: TfliteTensor  # onnx2tf's
    layout: tuple[str, str] | None  # (source layout, native layout) when they differ
    error: float = 0.0

    def spec_out(self) -> TensorSpec:
        if self.layout is None:
            return self.spec
        return self.spec.model_copy(update={"layout": self.layout[0], "native_layout": self.layout[1]})


@dataclass(frozen=True)
class _Mapping:
    inputs: list[_Match]
    outputs: list[_Match]
    max_abs_diff: float


def _map_io(
    onnx_path: Path, tflite: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], feed: dict[str, np.ndarray]
) -> _Mapping:
    info = describe(tflite)
    if len(info.inputs) != len(inputs) or len(info.outputs) != len(outputs):
        raise ConversionError(
            f"onnx2tf produced {len(info.inputs)} input(s) and {len(info.outputs)} output(s), the ONNX model has "
            f"{len(inputs)} and {len(outputs)}; edgepack cannot map them back"
        )
    input_pairs = _pair_inputs(inputs, info.inputs)
    reference = _onnx_outputs(onnx_path, feed, [o.name for o in outputs])
    best: _Mapping | None = None
    failure: ConversionError | None = None
    # Which layout each input has is clear from its shape except for ambiguous shapes ([1, 3, 3, 3]):
    # then every candidate is tried and the one whose outputs reproduce the ONNX model wins.
    for layouts in itertools.product(*[_layout_candidates(s, t) for s, t in input_pairs]):
        matched_inputs = [_Match(s, t, lay) for (s, t), lay in zip(input_pairs, layouts, strict=True)]
        results = _tflite_outputs(tflite, matched_inputs, feed)
        try:
            matched_outputs = _pair_outputs(outputs, info.outputs, reference, results)
        except ConversionError as exc:
            failure = exc
            continue
        worst = max((m.error for m in matched_outputs), default=0.0)
        if best is None or worst < best.max_abs_diff:
            best = _Mapping(matched_inputs, matched_outputs, worst)
    if best is None:
        raise failure or ConversionError("no assignment of onnx2tf's outputs reproduces the ONNX model's outputs")
    return best


def _pair_inputs(specs: list[TensorSpec], tensors: list[TfliteTensor]) -> list[tuple[TensorSpec, TfliteTensor]]:
    remaining = list(tensors)
    pairs: dict[str, TfliteTensor] = {}
    for spec in specs:
        names = _sanitized(spec.name)
        found = next((t for t in remaining if (t.key in names) or _tensor_base(t.name) in names), None)
        if found is not None:
            pairs[spec.name] = found
            remaining.remove(found)
    for spec in specs:  # by position among the unmatched ones
        if spec.name not in pairs:
            pairs[spec.name] = remaining.pop(0)
    for spec in specs:
        tensor = pairs[spec.name]
        if len(tensor.shape) != len(spec.shape):
            raise ConversionError(
                f"input {spec.name!r} has rank {len(spec.shape)} but onnx2tf's input {tensor.key or tensor.name!r} "
                f"has shape {list(tensor.shape)}"
            )
    return [(spec, pairs[spec.name]) for spec in specs]


def _layout_candidates(spec: TensorSpec, tensor: TfliteTensor) -> list[tuple[str, str] | None]:
    found: list[tuple[str, str] | None] = []
    if _shape_fits(spec.shape, tensor.shape):
        found.append(None)
    layouts = CHANNEL_LAYOUTS.get(len(spec.shape))
    if layouts and _shape_fits(permute_shape(spec.shape, *layouts), tensor.shape):
        found.insert(0, layouts)  # onnx2tf's default: channel-last
    if not found:
        raise ConversionError(
            f"input {spec.name!r} {list(spec.shape)} does not fit onnx2tf's input {list(tensor.shape)} in any "
            "layout edgepack knows (the source model's input may already be channel-last: onnx2tf assumes "
            "channel-first inputs; see docs/compiler.md)"
        )
    return found


def _pair_outputs(
    specs: list[TensorSpec],
    tensors: list[TfliteTensor],
    reference: dict[str, np.ndarray],
    results: dict[int, np.ndarray],
) -> list[_Match]:
    """Each source output gets the unused TFLite output (and layout) that reproduces it best."""
    matches: list[_Match] = []
    used: set[int] = set()
    for spec in specs:
        expected = reference[spec.name]
        scale = max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1e-6)
        names = _sanitized(spec.name)
        options = []
        for tensor in tensors:
            if tensor.index in used:
                continue
            got = results[tensor.index]
            for layout in _output_layouts(expected, got):
                value = transpose_layout(got, layout[1], layout[0]) if layout else got
                if value.shape != expected.shape:
                    continue
                err = (
                    float(np.max(np.abs(value.astype(np.float64) - expected.astype(np.float64)))) if value.size else 0.0
                )
                by_name = tensor.key in names or _tensor_base(tensor.name) in names
                options.append((err / scale, not by_name, tensor, layout, err))
        if not options:
            raise ConversionError(
                f"no output of onnx2tf's model has the shape of output {spec.name!r} {list(expected.shape)}"
            )
        rel, _, tensor, layout, err = min(options, key=lambda o: (o[0], o[1]))
        if rel > _MATCH_TOLERANCE:
            raise ConversionError(
                f"onnx2tf's model does not reproduce output {spec.name!r}: the closest output differs by "
                f"{err:.3g} (relative {rel:.2g}) on a calibration sample"
            )
        used.add(tensor.index)
        matches.append(_Match(spec, tensor, layout, err))
    return matches


def _output_layouts(expected: np.ndarray, got: np.ndarray) -> list[tuple[str, str] | None]:
    options: list[tuple[str, str] | None] = []
    if got.shape == expected.shape:
        options.append(None)
    layouts = CHANNEL_LAYOUTS.get(expected.ndim)
    if layouts and got.ndim == expected.ndim and tuple(permute_shape(list(expected.shape), *layouts)) == got.shape:
        options.append(layouts)
    return options


def _sanitized(name: str) -> set[str]:
    """The names onnx2tf / TensorFlow may have turned ``name`` into."""
    variants = {name, name.replace(":", "__"), name.replace(":", "_"), re.sub("^/", "wa/", name)}
    variants |= {re.sub(r"[^A-Za-z0-9_.\-/]", "_", v) for v in list(variants)}
    return variants


def _tensor_base(tensor_name: str) -> str:
    """``serving_default_x:0`` -> ``x``."""
    base = re.sub(r":\d+$", "", tensor_name)
    return base.removeprefix("serving_default_")


def _shape_fits(spec_shape: Sequence[int | str], tflite_shape: Sequence[int]) -> bool:
    if len(spec_shape) != len(tflite_shape):
        return False
    return all(not isinstance(a, int) or b < 0 or a == b for a, b in zip(spec_shape, tflite_shape, strict=True))


def _onnx_outputs(onnx_path: Path, feed: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    from edgepack.compiler.runner import raw_session

    session = raw_session(onnx_path, threads=1)
    values = session.run(names, {k: np.asarray(v) for k, v in feed.items()})
    return dict(zip(names, values, strict=True))


def _tflite_outputs(tflite: Path, inputs: list[_Match], feed: Mapping[str, np.ndarray]) -> dict[int, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite), num_threads=1)
    details = {int(d["index"]): d for d in interpreter.get_input_details()}
    for match in inputs:
        array = np.asarray(feed[match.spec.name])
        if match.layout:
            array = transpose_layout(array, *match.layout)
        if tuple(details[match.tensor.index]["shape"]) != array.shape:
            interpreter.resize_tensor_input(match.tensor.index, list(array.shape), strict=False)
    try:
        interpreter.allocate_tensors()
        for match in inputs:
            array = np.asarray(feed[match.spec.name])
            if match.layout:
                array = transpose_layout(array, *match.layout)
            interpreter.set_tensor(
                match.tensor.index, np.ascontiguousarray(array.astype(details[match.tensor.index]["dtype"]))
            )
        interpreter.invoke()
        empty = [d for d in interpreter.get_output_details() if 0 in list(d["shape"])]
        if empty:  # onnx2tf got a shape computation wrong: an output with a 0 dimension cannot be read
            shapes = ", ".join(f"{d['name']} {[int(v) for v in d['shape']]}" for d in empty)
            raise UnsupportedModelError(
                f"onnx2tf's TFLite model has output(s) with a dimension of 0 ({shapes}) that the ONNX model does "
                "not have: onnx2tf mis-converted a shape computation of this model; compile for a target whose "
                "runtime runs ONNX (x86, intel-cpu), or simplify the shape ops that feed those outputs"
            )
        return {int(d["index"]): np.array(interpreter.get_tensor(d["index"])) for d in interpreter.get_output_details()}
    except (RuntimeError, ValueError) as exc:  # e.g. a custom op this LiteRT has no kernel for
        raise UnsupportedModelError(
            f"onnx2tf's TFLite model does not run on LiteRT {installed_version('ai-edge-litert')}: {exc}; compile for a target "
            "whose runtime runs ONNX (e.g. x86), or replace the op it names"
        ) from exc


def _fit_ir_version(proto: onnx.ModelProto) -> None:
    """Lower the IR version of the copy to what the toolchain reads, when the opsets allow it."""
    if proto.ir_version <= _TOOLCHAIN_MAX_IR:
        return
    needed = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    if needed > _TOOLCHAIN_MAX_IR:
        raise UnsupportedModelError(
            f"the model needs ONNX IR version {needed} (its opsets {[(o.domain, o.version) for o in proto.opset_import]}); "
            f"the TFLite converter reads IR <= {_TOOLCHAIN_MAX_IR}: export it with an older opset"
        )
    log.info("ONNX IR version %d lowered to %d for onnx2tf", proto.ir_version, max(needed, 8))
    proto.ir_version = max(needed, 8)


# --- onnx2tf's side files --------------------------------------------------------------------------


def _write_sample_images(work: Path, inputs: Sequence[TensorSpec], feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Put the file onnx2tf would download into its working directory, made of real samples.

    onnx2tf loads it only when every input is a 4-D 3-channel image and resizes it to the input's size; it
    feeds it to its own ONNX-vs-TF checks. Written for every model so no code path can reach the network.
    """
    spec = inputs[0]
    rows: list[np.ndarray] = []
    if len(spec.shape) == 4:
        for feed in feeds[:20]:
            array = np.asarray(feed[spec.name], dtype=np.float32)
            if array.ndim == 4 and array.shape[1] in (3, 4):
                rows.extend(np.transpose(array, (0, 2, 3, 1))[:, :, :, :3])
    images = np.stack(rows[:20]) if rows else np.zeros((20, 8, 8, 3), np.float32)
    np.save(work / SAMPLE_IMAGE_FILE, images.astype(np.float32))


def _calibration_files(
    work: Path, inputs: Sequence[TensorSpec], samples: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, str]:
    """Stack calibration samples per input into the NHWC .npy files onnx2tf's int8 path reads."""
    files = {}
    for spec in inputs:
        stacked = np.concatenate([np.asarray(s[spec.name], dtype=np.float32) for s in samples])
        layouts = CHANNEL_LAYOUTS.get(stacked.ndim)
        if layouts:
            stacked = transpose_layout(stacked, *layouts)
        path = work / f"calib_{len(files)}.npy"
        np.save(path, stacked)
        files[spec.name] = str(path)
    return files


def _int8_output(work: Path, produced: Path, final: Path, mapping: _Mapping) -> Path:
    """onnx2tf's full-integer model, with the same I/O names and order as the float one.

    Its signature keys are not the float model's (outputs become ``output_0``...), but its graph is the
    same: tensors are matched by tensor name, then by position.
    """
    source = work / "out" / "model_full_integer_quant.tflite"
    if not source.is_file():
        raise ConversionError(f"onnx2tf wrote no {source.name}; see {work.parent / LOG_NAME}")
    float_info, quant_info = describe(produced), describe(source)

    def counterpart(tensor: TfliteTensor, floats: list[TfliteTensor], quants: list[TfliteTensor]) -> int:
        same = [q for q in quants if q.name == tensor.name]
        if len(same) == 1:
            return same[0].index
        if len(floats) != len(quants):
            raise ConversionError("onnx2tf's int8 model does not have the float model's inputs and outputs")
        return quants[[f.index for f in floats].index(tensor.index)].index

    names_in = {counterpart(m.tensor, float_info.inputs, quant_info.inputs): m.spec.name for m in mapping.inputs}
    order_out = [counterpart(m.tensor, float_info.outputs, quant_info.outputs) for m in mapping.outputs]
    target = final.with_name("model_onnx2tf_int8.tflite")
    rewrite_io(
        source,
        target,
        input_names=names_in,
        output_names={i: m.spec.name for i, m in zip(order_out, mapping.outputs, strict=True)},
        input_order=list(names_in),
        output_order=order_out,
    )
    return target


# --- results and errors --------------------------------------------------------------------------


def _read_result(path: Path, returncode: int, log_path: Path, onnx_path: Path) -> dict[str, Any]:
    if not path.is_file():
        tail = _log_tail(log_path)
        log_path = _keep_log(log_path, onnx_path)
        raise ConversionError(
            f"onnx2tf exited with code {returncode} without a result (killed, or out of memory?); "
            f"last lines of {log_path}: {tail}"
        )
    return json.loads(path.read_text())


def _conversion_error(result: Mapping[str, Any], proto: onnx.ModelProto, log_path: Path) -> Exception:
    lines = [line.strip() for line in str(result.get("error") or "").splitlines() if line.strip()]
    message = " / ".join(lines[:2])[:400] or str(result.get("error_type") or "unknown error")
    not_builtin = result.get("not_builtin_ops")
    if not_builtin:
        wanted = {str(op).lower() for op in not_builtin}
        nodes = [f"{n.name!r} (op {n.op_type})" for n in proto.graph.node if n.op_type.lower() in wanted]
        where = f" — from ONNX node(s) {', '.join(nodes[:8])}" if nodes else ""
        return UnsupportedModelError(
            f"converted to TFLite, the model needs TensorFlow op(s) {', '.join(map(str, not_builtin))} that have "
            f"no TFLite builtin and that LiteRT cannot run (no Flex delegate on the devices){where}. Replace "
            f"that op in the model, or compile for a target whose runtime runs ONNX (e.g. x86); log: {log_path}"
        )
    node_name = result.get("node")
    if node_name:
        node = _find_node(proto, str(node_name))
        op = f"{node.domain + '::' if node.domain else ''}{node.op_type}" if node is not None else "?"
        shown = node.name if node is not None else str(node_name)
        if result.get("error_type") == "ModuleNotFoundError" or "not yet implemented" in message:
            return UnsupportedModelError(
                f"onnx2tf cannot convert node {shown!r} (op {op}) for TFLite: onnx2tf has no converter for this "
                "op. Replace or remove that op in the model, or compile for a target whose runtime runs ONNX "
                f"(e.g. x86); log: {log_path}"
            )
        if node is not None and node.op_type in ("LSTM", "GRU", "RNN"):
            return UnsupportedModelError(
                f"onnx2tf cannot convert recurrent node {shown!r} (op {op}) for TFLite ({result.get('error_type')}: "
                f"{message[:200]}), and edgepack could not unroll it into matrix products because "
                f"{why_not_unrolled(proto, node.name)}. Export the model with a forward LSTM of a static "
                "sequence length (batch and sequence fixed, default activations, no peepholes), or compile for "
                f"a target whose runtime runs ONNX recurrent ops (x86, intel-cpu); log: {log_path}"
            )
        return UnsupportedModelError(
            f"onnx2tf failed to convert node {shown!r} (op {op}) for TFLite: {result.get('error_type')}: "
            f"{message}. If an input has dynamic dimensions, fix them with --input-shape; log: {log_path}"
        )
    return ConversionError(
        f"onnx2tf failed ({result.get('error_type')}: {message}). If an input has dynamic dimensions, fix "
        f"them with --input-shape; log: {log_path}"
    )


def _keep_log(log_path: Path, onnx_path: Path) -> Path:
    """Copy a failed conversion's log out of the compile's temporary folder (which is deleted) into
    ``<toolchains root>/logs/``, so the error can point at it."""
    from datetime import datetime, timezone

    from edgepack.compiler.toolchain import toolchains_root

    if not log_path.is_file():
        return log_path
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    kept = toolchains_root() / "logs" / f"onnx2tf-{stamp}-{onnx_path.stem}.log"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(log_path, kept)
    return kept


def _find_node(proto: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    candidates = {name, re.sub("^wa/", "/", name), name.replace("__", ":")}
    for node in proto.graph.node:
        if node.name in candidates or _sanitized(node.name) & candidates:
            return node
    return None


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " / ".join(text[-lines:])


def _random_feed(inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for spec in inputs:
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feed
