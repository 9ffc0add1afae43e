"""A TFLite source for ONNX Runtime targets: convert it to ONNX with tf2onnx (its ``--tflite`` input).

tf2onnx imports TensorFlow (and pins numpy 1.x through it), which cannot share edgepack's environment, so
it runs in the managed ``tf2onnx`` toolchain (:mod:`edgepack.compiler.toolchain`; ``edgepack toolchain
install tf2onnx`` installs it ahead of time, else the first such compile does, once).

What comes out is held to the same checks as any compiled model: the pipeline's reference outputs for a
TFLite source come from LiteRT running the original file (:mod:`edgepack.compiler.load_tflite`), and every
candidate built from the converted ONNX — fp32, fp16, int8 — is judged against them. The converted graph
gets the source's tensor names: tf2onnx names inputs and outputs after TFLite's tensors
(``serving_default_x:0``), LiteRT and the bundle use the signature's (``x``), so they are renamed here by
the signature's tensor indices. The layout stays the TFLite one (NHWC images), as the source's signature
says.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx

from edgepack.compiler.node_errors import name_nodes
from edgepack.compiler.toolchain import ensure_toolchain
from edgepack.errors import UnsupportedModelError
from edgepack.manifest import TensorSpec

log = logging.getLogger(__name__)

OPSET = 17
TIMEOUT_S = 900.0


def tflite_to_onnx(
    source: Path,
    out: Path,
    *,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    workdir: Path,
    note: Callable[[str], None] = lambda _text: None,
) -> tuple[Path, str]:
    """Convert the TFLite file ``source`` to the ONNX file ``out`` with the source's tensor names; returns
    ``out`` and tf2onnx's version. :class:`UnsupportedModelError` (with tf2onnx's own words) when it cannot."""
    chain = ensure_toolchain("tf2onnx", on_progress=note)
    note(f"tf2onnx {chain.versions.get('tf2onnx', '?')}: TFLite -> ONNX (opset {OPSET})")
    log_path = workdir / "tf2onnx.log"
    raw = workdir / "tf2onnx-raw.onnx"
    args = ["-m", "tf2onnx.convert", "--tflite", str(source), "--output", str(raw), "--opset", str(OPSET)]
    run = chain.run(args, cwd=workdir, log_path=log_path, env={"TF_CPP_MIN_LOG_LEVEL": "3"}, timeout_s=TIMEOUT_S)
    if run.returncode != 0 or not raw.exists():
        raise UnsupportedModelError(
            f"tf2onnx could not convert {source.name} to ONNX for onnxruntime: {_tail(log_path)}; "
            "export the model to ONNX yourself, or pick a target whose runtime reads TFLite (rpi4, intel-cpu)"
        )
    proto = onnx.load(str(raw))
    _rename_io(proto, source, inputs, outputs)
    name_nodes(proto)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise UnsupportedModelError(f"tf2onnx's ONNX model of {source.name} does not check: {exc}") from exc
    onnx.save(proto, str(out))
    return out, chain.versions.get("tf2onnx", "?")


def _rename_io(
    proto: onnx.ModelProto, source: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> None:
    """Graph inputs/outputs renamed from TFLite tensor names to the signature names of ``inputs``/``outputs``."""
    tensor_names = _signature_tensors(source)
    graph = proto.graph
    mapping: dict[str, str] = {}
    for value, specs in ((graph.input, inputs), (graph.output, outputs)):
        have = {v.name: v for v in value}
        for spec in specs:
            tensor = tensor_names.get(spec.name, spec.name)
            found = next((n for n in (tensor, f"{tensor}:0", spec.name) if n in have), None)
            if found is None:
                raise UnsupportedModelError(
                    f"tf2onnx's ONNX model of {source.name} has no tensor for {spec.name!r} (TFLite tensor "
                    f"{tensor!r}); its inputs/outputs are {', '.join(have)}"
                )
            if found != spec.name:
                mapping[found] = spec.name
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for value in [*graph.input, *graph.output]:
        value.name = mapping.get(value.name, value.name)


def _signature_tensors(source: Path) -> dict[str, str]:
    """Signature key -> TFLite tensor name, for the inputs and outputs of the model's one signature."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(source))
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        return {}
    runner = interpreter.get_signature_runner(next(iter(signatures)))
    by_index = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    names = {key: by_index.get(d["index"], key) for key, d in runner.get_input_details().items()}
    names.update({key: by_index.get(d["index"], key) for key, d in runner.get_output_details().items()})
    return names


def _tail(log_path: Path) -> str:
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return " / ".join((errors or lines)[-3:])[:600]
