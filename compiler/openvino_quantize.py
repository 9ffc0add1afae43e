"""int8 for OpenVINO targets: NNCF post-training quantization, accuracy-aware through NNCF's ignored scope.

NNCF quantizes the converted ``openvino.Model`` (its OpenVINO backend), not the ONNX file: one path for
ONNX and TFLite sources alike, and no opset floor — NNCF's *ONNX* backend refuses models below opset 10,
the OpenVINO one takes whatever OpenVINO's frontends read. (``scripts/bench/bench_openvino_int8.py``
measures the ONNX backend too, after raising the opset, for comparison.) Settings: the target's device
(``nncf.TargetDevice``), the performance preset (symmetric int8 activations, per-channel symmetric int8
weights — what OpenVINO's CPU int8 kernels run), fast bias correction, statistics over all the user's
calibration samples.

Accuracy-aware, as for the ONNX Runtime targets (:mod:`edgepack.compiler.accuracy_aware`): quantize
everything and let the pipeline judge the result with its bar; while the bar fails, analyse the int8 model
against the float one on calibration samples (:func:`analyse`: every activation quantizer NNCF inserted,
scored by its tensor's worst-channel SQNR and by the output SQNR regained when it alone is bypassed) and
keep the worst tensor in float by putting its consumers in NNCF's ``IgnoredScope``; one tensor per step,
then doubling, until the bar holds, the step budget is spent or half the quantized tensors would be
float. The ranking is by output effect, not by the tensor's own SQNR as on the ONNX Runtime path:
measured on the digits CNN with a 10^4 outlier channel, the tensor-SQNR ranking spent its steps on a
harmless early activation and never reached the culprit; the output ranking finds it first.

``nncf.quantize_with_accuracy_control`` (NNCF's own accuracy-aware quantization) was measured against
this on the same model (``scripts/bench/bench_openvino_int8.py``, accuracy-aware table): see
``docs/compiler.md`` for the numbers and why the search here stays ours — it judges every candidate with
the compiler's own bar, on the same backend, and records which nodes stayed float and why.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from edgepack.compiler.accuracy_aware import SEARCH_BUDGET_S, KeptInFloat, keep_worst_in_float
from edgepack.compiler.compare import AccuracyReport
from edgepack.compiler.family import Conversion, ConvertJob, HostModel
from edgepack.compiler.node_errors import EnergySums, _scores  # the per-channel SQNR of the ONNX Runtime analysis
from edgepack.compiler.openvino_convert import compiled_model, host_config, openvino_version, save_ir
from edgepack.compiler.quantizer_failures import quantizer_failures
from edgepack.targets.openvino_family import inference_precision
from edgepack.targets.registry import Target

log = logging.getLogger(__name__)

Feeds = Sequence[dict[str, np.ndarray]]

_ANALYSIS_SAMPLES = 16


@dataclass(frozen=True)
class NncfSettings:
    """How NNCF quantizes; recorded in the manifest's ``quantization``."""

    target_device: Literal["CPU", "GPU", "NPU", "ANY"] = "CPU"
    preset: Literal["performance", "mixed"] = "performance"
    fast_bias_correction: bool = True
    subset_size: int = 300
    # NNCF's overflow fix: 7-bit weights where int8 kernels without VNNI would saturate 16-bit sums
    # ("first_layer" is NNCF's default; see the target options for the measured choice).
    overflow_fix: Literal["enable", "first_layer", "disable"] = "first_layer"

    @classmethod
    def for_target(cls, target: Target, samples: int) -> NncfSettings:
        return cls(
            target_device=str(target.options.get("device", "CPU")),  # type: ignore[arg-type]
            subset_size=max(samples, 1),
            overflow_fix=str(target.options.get("nncf_overflow_fix", "first_layer")),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "static post-training (nncf.quantize, OpenVINO backend)",
            "activations": "int8 per-tensor" + (", symmetric" if self.preset == "performance" else ", asymmetric"),
            "weights": "int8 per-channel, symmetric" + (", 7-bit range" if self.overflow_fix == "enable" else ""),
            **asdict(self),
        }


def quantize(model: Any, feeds: Feeds, settings: NncfSettings, ignored: Sequence[str] = ()) -> Any:
    """An int8 copy of the ``openvino.Model`` ``model``; ops named in ``ignored`` stay float."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    nncf.set_log_level(logging.ERROR)
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    fixes = {"enable": OverflowFix.ENABLE, "first_layer": OverflowFix.FIRST_LAYER, "disable": OverflowFix.DISABLE}
    scope = nncf.IgnoredScope(names=list(ignored), validate=False) if ignored else None
    with quantizer_failures(f"NNCF {nncf.__version__}"), _quiet():
        return nncf.quantize(
            model,
            nncf.Dataset(list(feeds)),
            preset=presets[settings.preset],
            target_device=nncf.TargetDevice[settings.target_device],
            subset_size=min(len(feeds), settings.subset_size),
            fast_bias_correction=settings.fast_bias_correction,
            ignored_scope=scope,
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=fixes[settings.overflow_fix]),
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """Keep NNCF's rich progress bars (written straight to stdout, with no switch to turn them off) out of
    the compiler's own progress display; what they said goes to the debug log."""
    sink = io.StringIO()
    with redirect_stdout(sink), redirect_stderr(sink):
        yield
    if sink.getvalue().strip():
        log.debug("nncf: %s", sink.getvalue().strip())


def search_int8(model: Any, job: ConvertJob, *, max_steps: int = 8, max_float_fraction: float = 0.5) -> Conversion:
    """The accuracy-aware int8 search for ``job`` (see the module docstring)."""
    feeds = job.calibration.feeds
    settings = NncfSettings.for_target(job.target, len(feeds))
    ignored: list[str] = []
    kept: list[KeptInFloat] = []
    tries: list[dict[str, Any]] = []
    report: AccuracyReport | None = None
    total: int | None = None
    started = time.monotonic()
    for step in range(max_steps + 1):
        if step > 0 and time.monotonic() - started > SEARCH_BUDGET_S:
            tries[-1]["stopped"] = f"time budget spent ({time.monotonic() - started:.0f} s of {SEARCH_BUDGET_S:.0f} s)"
            log.info("int8: %s", tries[-1]["stopped"])
            break
        quantized = quantize(model, feeds, settings, ignored)
        host = save_ir(job, quantized, f"int8-step{step}")
        report = job.evaluate(host)
        tries.append(
            {"step": step, "nodes_in_float": len(ignored), "passed": report.passed, "summary": report.summary()}
        )
        log.info(
            "int8 try %d (%d nodes in float): %s", step, len(ignored), "passes" if report.passed else report.failures
        )
        job.note(f"int8 try {step}: {len(ignored)} node(s) in float, {'passes' if report.passed else 'fails'}")
        if report.passed:
            compiled = compiled_model(job, host, _quantization(job, settings, kept))
            compiled.kept_in_float = list(kept)
            return Conversion("int8", compiled, report, tries, list(kept), baseline=_baseline(job, model))
        if step == max_steps:
            tries[-1]["stopped"] = f"step budget spent ({max_steps} steps)"
            break
        findings = analyse(model, quantized, feeds[:_ANALYSIS_SAMPLES])
        if total is None:  # activation quantizers of the fully quantized model
            total = sum(1 for fq in _fake_quantizes(quantized) if not _is_weight(fq))
        if not keep_worst_in_float(findings, ignored, kept, step):
            tries[-1]["stopped"] = (
                "no activation quantizer whose bypass alone gives the outputs back any accuracy "
                "(the loss is spread over many of them)"
            )
            log.info("int8: %s", tries[-1]["stopped"])
            break
        if len(kept) > max_float_fraction * total:
            tries[-1]["stopped"] = f"{len(kept)} of {total} quantized tensors would be float; int8 no longer pays"
            log.info("int8: %s", tries[-1]["stopped"])
            break
    return Conversion("int8", None, report, tries, kept)


@dataclass(frozen=True)
class QuantizerCost:
    """One activation quantizer of the int8 model and what it costs."""

    tensor: str  # "<producer op>:<output index>"
    worst_channel_sqnr_db: float  # the quantized tensor against the float model, worst channel
    sqnr_db: float  # whole tensor
    output_gain_db: float  # output SQNR regained when this quantizer alone is bypassed (the ranking key)
    nodes: tuple[str, ...]  # ops to put in the ignored scope so the tensor stays float (see _requesters)

    def reason(self) -> str:
        return (
            f"activation {self.tensor!r} costs {self.output_gain_db:.1f} dB of output SQNR under int8: worst "
            f"channel SQNR {self.worst_channel_sqnr_db:.1f} dB vs the float model (whole tensor {self.sqnr_db:.1f} dB)"
        )


def analyse(float_model: Any, int8_model: Any, feeds: Feeds, *, max_candidates: int = 8) -> list[QuantizerCost]:
    """Activation quantizers of ``int8_model`` that hurt the outputs, the most harmful first.

    Each activation ``FakeQuantize`` is scored twice on ``feeds``: its tensor against the same tensor of
    the float model (the output of the op it quantizes, found by friendly name — NNCF keeps them), per
    channel; and, for the ``max_candidates`` lowest by worst-channel and by whole-tensor SQNR, what
    bypassing it alone gives back at the model's outputs (output SQNR against the float model, worst
    output). The second ranks: a tensor's own SQNR says how coarse its grid is, not whether
    the model cares (measured: the digits CNN's first activation has the lowest per-channel SQNR and does
    not matter, while the tensor with a 10^4 outlier channel — 1 dB — costs the whole classifier).
    """
    import openvino as ov

    fqs = [fq for fq in _fake_quantizes(int8_model) if not _is_weight(fq)]
    float_ops = {op.get_friendly_name(): op for op in float_model.get_ordered_ops()}
    pairs = []  # (fq name, producer name, port index, consumers)
    for fq in fqs:
        source = fq.input_value(0)
        producer = source.get_node()
        consumers = _requesters(fq)
        if producer.get_friendly_name() in float_ops and consumers:
            pairs.append((fq.get_friendly_name(), producer.get_friendly_name(), source.get_index(), consumers))
    if not pairs:
        return []
    core = ov.Core()
    config = host_config({"inference_precision": "f32"})
    # streamed: one feed through both models at a time, energies summed per channel (never every tensor of
    # every sample at once: that is what took a 640x640 detector's analysis to GBs)
    sums = [EnergySums() for _ in pairs]
    q_run = _collector(core, int8_model, [(name, 0) for name, _p, _i, _c in pairs], feeds, config)
    f_run = _collector(core, float_model, [(p, i) for _n, p, i, _c in pairs], feeds, config)
    for feed in feeds:
        for acc, quantized, original in zip(sums, q_run(feed), f_run(feed), strict=True):
            acc.add(original, quantized)
    reference = _outputs(core, float_model, feeds, config)
    base = _output_sqnr(reference, _outputs(core, int8_model, feeds, config))

    scored = []
    for (name, producer, index, consumers), acc in zip(pairs, sums, strict=True):
        worst, whole = acc.scores()
        scored.append((name, f"{producer}:{index}", worst, whole, consumers))
    # Bypassing costs a compile of the model per quantizer: test the likeliest culprits only, the tensors
    # with the lowest worst-channel and the lowest whole-tensor SQNR.
    by_worst = sorted(scored, key=lambda item: item[2])[:max_candidates]
    by_whole = sorted(scored, key=lambda item: item[3])[:max_candidates]
    candidates = list({item[0]: item for item in [*by_worst, *by_whole]}.values())
    findings: list[QuantizerCost] = []
    for name, tensor, worst, whole, consumers in candidates:
        bypassed = _output_sqnr(reference, _outputs(core, _bypass(int8_model, name), feeds, config))
        gain = bypassed - base
        if gain > 0.01:
            findings.append(QuantizerCost(tensor, worst, whole, gain, consumers))
    findings.sort(key=lambda f: (-f.output_gain_db, f.worst_channel_sqnr_db))
    log.info(
        "int8 analysis: %d activation quantizers, %d bypassed, %d matter", len(pairs), len(candidates), len(findings)
    )
    return findings


# Ops NNCF propagates a quantizer through (they compute the same on int8 as on float values): the op that
# asked for the quantizer is further down. Ignoring only the first consumer — a MaxPool — would keep it.
_AGNOSTIC = frozenset(
    {"MaxPool", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Split", "VariadicSplit", "StridedSlice", "Slice",
     "Pad", "Concat", "DepthToSpace", "SpaceToDepth", "Interpolate", "Broadcast", "Tile", "ShuffleChannels",
     "ReduceMax", "Gather", "Relu", "Clamp"}
)  # fmt: skip


def _requesters(fq: Any) -> tuple[str, ...]:
    """Names of the ops whose inputs ``fq`` quantizes: its consumers, looking through agnostic ops (which
    are named too). Putting them in the ignored scope removes the quantizer."""
    names: list[str] = []
    pending = [t.get_node() for t in fq.output(0).get_target_inputs()]
    seen: set[str] = set()
    while pending:
        node = pending.pop(0)
        name = node.get_friendly_name()
        if name in seen or node.get_type_name() in ("Result", "FakeQuantize"):
            continue
        seen.add(name)
        names.append(name)
        if node.get_type_name() in _AGNOSTIC:
            pending.extend(t.get_node() for out in node.outputs() for t in out.get_target_inputs())
    return tuple(names)


def _bypass(model: Any, fq_name: str) -> Any:
    """A copy of ``model`` whose quantizer ``fq_name`` passes its input through unquantized."""
    clone = model.clone()
    fq = next(op for op in clone.get_ordered_ops() if op.get_friendly_name() == fq_name)
    for target in list(fq.output(0).get_target_inputs()):
        target.replace_source_output(fq.input_value(0))
    return clone


def _outputs(core: Any, model: Any, feeds: Feeds, config: dict[str, Any]) -> list[list[np.ndarray]]:
    """Per output, the values for every feed."""
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    values: list[list[np.ndarray]] = [[] for _ in compiled.outputs]
    for feed in feeds:
        result = request.infer(dict(feed), share_outputs=False)
        for i, port in enumerate(compiled.outputs):
            values[i].append(np.asarray(result[port]))
    return values


def _output_sqnr(reference: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """The worst output's whole-tensor SQNR (dB) against the float model."""
    return min(_scores(np.concatenate(r), np.concatenate(g))[1] for r, g in zip(reference, got, strict=True))


def _collector(core: Any, model: Any, wanted: Sequence[tuple[str, int]], feeds: Feeds, config: dict[str, Any]) -> Any:
    """A function feed -> the values of the ``wanted`` tensors (op friendly name, output index) for it.

    A copy of ``model`` gets them as extra outputs; a graph input's value is the feed itself.
    """
    clone = model.clone()
    ops = {op.get_friendly_name(): op for op in clone.get_ordered_ops()}
    extra: dict[int, Any] = {}
    params: dict[int, str] = {}
    for i, (name, index) in enumerate(wanted):
        op = ops[name]
        if op.get_type_name() == "Parameter":
            names = op.output(0).get_names()
            params[i] = next((n for n in feeds[0] if n in names), name) if feeds else name
        else:
            extra[i] = op.output(index)
    added = clone.add_outputs(list(extra.values())) if extra else []
    compiled = core.compile_model(clone, "CPU", config)
    request = compiled.create_infer_request()
    ports = dict(zip(extra, compiled.outputs[len(compiled.outputs) - len(added) :], strict=True))

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = request.infer(dict(feed), share_outputs=False)
        return [np.asarray(feed[params[i]] if i in params else result[ports[i]]) for i in range(len(wanted))]

    return run


def _fake_quantizes(model: Any) -> list[Any]:
    return [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]


def _is_weight(fq: Any) -> bool:
    return fq.input_value(0).get_node().get_type_name() == "Constant"


def _baseline(job: ConvertJob, model: Any) -> HostModel | None:
    """fp32 IR for the speed comparison, on CPU targets only (this CPU says nothing about a GPU/NPU)."""
    if job.target.options.get("device", "CPU") != "CPU":
        return None
    return save_ir(job, model, "fp32-baseline", fp16=False, precision="fp32")


def _quantization(job: ConvertJob, settings: NncfSettings, kept: list[KeptInFloat]) -> dict[str, Any]:
    import nncf

    return {
        "precision": "int8",
        "tool": f"nncf {nncf.__version__}, openvino {openvino_version()}",
        **settings.to_dict(),
        "accuracy_aware": "nncf.IgnoredScope from per-tensor SQNR analysis (edgepack)",
        "inference_precision": inference_precision(job.target, "int8"),
        "nodes_in_float": [n for k in kept for n in k.nodes],
        "kept_in_float": [k.to_dict() for k in kept],
    }
