"""Accuracy-aware int8: quantize, and while the accuracy bar fails keep the worst nodes in float.

Plain int8 breaks many real models (detectors whose boxes and scores share a tensor, activation
outliers, recurrent state). The search:

1. quantize everything (static QDQ, the target's settings) and compare against the float model;
2. if the bar fails, run the per-node error analysis (:mod:`edgepack.compiler.node_errors`) on
   calibration samples and keep the worst-scoring tensor in float — its producer and consumers are
   excluded from quantization — then quantize again (calibration ranges are cached, so this is cheap);
3. repeat, one tensor per step for the first steps and then doubling, until the bar holds, the step
   budget or the time budget (:data:`SEARCH_BUDGET_S`, checked before each new try) is spent, or half the
   graph would be float (int8 no longer pays). The caller falls back to fp16/fp32 only when this finds
   nothing, and the last try says why the search stopped.

Two structural steps come before the analysis, each once: an output that fails in one of its slices gets
its concatenation kept in float (:func:`keep_mixed_scale_concats`), and an output made by a squashing
activation (Sigmoid, Softmax) through upsampling — a detector's probability-map head — gets that head
kept in float (:func:`head_nodes`): int8 logits in front of a sigmoid lose most where the sigmoid is
steepest, and the upsampling that follows spreads the error over every pixel.

Memory stays bounded whatever the model and the number of samples: calibration is streamed sample by
sample (:mod:`edgepack.compiler.quantize_ort`), the analysis per sample and per group of tensors
(:mod:`edgepack.compiler.node_errors`), and nothing here keeps outputs of more than one try.

For MatMul-heavy models without convolutions (transformers, MLPs) dynamic quantization is tried as well,
and the faster of the two that pass is kept — measured on this host, not assumed.

The outcome lists every node kept in float with the reason (which tensor, its SQNR under int8) and the
step that added it, plus each try's result; the pipeline adds the speed against fp32.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.compiler.compare import AccuracyReport
from edgepack.compiler.node_errors import analyse
from edgepack.compiler.output_slices import concat_nodes
from edgepack.compiler.quantize_ort import Int8Settings, quantize_int8
from edgepack.compiler.speed import latency_ms
from edgepack.errors import QuantizerError

log = logging.getLogger(__name__)

Feeds = Sequence[dict[str, np.ndarray]]

# Seconds the static search may spend before it stops starting new tries (a try under way finishes). A
# 640x640 detector takes about 45 s a try on 2 cores (quantize, judge, analyse); a small model 1-2 s.
SEARCH_BUDGET_S = 180.0
# Ops a probability-map head is made of, from the output back (see head_nodes).
_SQUASH = frozenset({"Sigmoid", "Softmax", "HardSigmoid"})
_UPSAMPLE = frozenset({"Resize", "Upsample", "ConvTranspose", "DepthToSpace"})
_HEAD_OPS = _SQUASH | _UPSAMPLE | frozenset({"Add", "Mul", "Sub", "Div", "Relu", "Clip", "BatchNormalization", "Conv"})


@dataclass(frozen=True)
class KeptInFloat:
    nodes: tuple[str, ...]
    reason: str
    step: int

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": list(self.nodes), "reason": self.reason, "step": self.step}


@dataclass
class Int8Outcome:
    """The int8 model that passed (``model``), or None, and how the search got there."""

    model: Path | None
    settings: Int8Settings
    report: AccuracyReport | None
    kept_in_float: list[KeptInFloat] = field(default_factory=list)
    tries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def nodes_in_float(self) -> list[str]:
        return [n for k in self.kept_in_float for n in k.nodes]


def search_int8(
    fp32_model: Path,
    workdir: Path,
    *,
    calibration: Feeds,
    analysis_feeds: Feeds,
    settings: Int8Settings,
    evaluate: Callable[[Path], AccuracyReport],
    adaptive: bool = True,
    max_steps: int = 8,
    try_dynamic: bool = False,
    on_try: Callable[[str], None] | None = None,
    budget_s: float = SEARCH_BUDGET_S,
) -> Int8Outcome:
    """Find an int8 model of ``fp32_model`` that passes ``evaluate``'s bar; see the module docstring."""
    cache = workdir / f"calibration-ranges-{settings.calibrate_method}.json"
    static = _static_search(
        fp32_model,
        workdir,
        calibration,
        analysis_feeds,
        settings,
        evaluate,
        adaptive,
        max_steps,
        cache,
        on_try,
        budget_s=budget_s,
    )
    if not try_dynamic:
        return static
    dynamic_settings = settings.dynamic()
    dyn_path = workdir / "int8-dynamic.onnx"
    try:
        quantize_int8(fp32_model, dyn_path, calibration, dynamic_settings)
    except QuantizerError as exc:  # the static result stands on its own
        log.warning("dynamic int8 skipped: %s", exc)
        static.tries.append({"step": "dynamic", "passed": False, "error": str(exc)})
        return static
    dyn_report = evaluate(dyn_path)
    dyn_try = {"step": "dynamic", "nodes_in_float": 0, "passed": dyn_report.passed, "summary": dyn_report.summary()}
    if on_try:
        on_try(f"dynamic int8: {'passes' if dyn_report.passed else 'fails'}")
    if not dyn_report.passed:
        static.tries.append(dyn_try)
        return static
    if static.model is None:
        return Int8Outcome(dyn_path, dynamic_settings, dyn_report, [], [*static.tries, dyn_try])
    feed = dict(calibration[0])
    t_static = latency_ms(static.model, feed, threads=1, budget_s=0.5)
    t_dynamic = latency_ms(dyn_path, feed, threads=1, budget_s=0.5)
    dyn_try["latency_ms"] = round(t_dynamic, 4)
    static.tries[-1]["latency_ms"] = round(t_static, 4)
    log.info("static int8 %.3f ms, dynamic int8 %.3f ms", t_static, t_dynamic)
    if t_dynamic < t_static:
        return Int8Outcome(dyn_path, dynamic_settings, dyn_report, [], [*static.tries, dyn_try])
    static.tries.append(dyn_try)
    return static


def _static_search(
    fp32_model: Path,
    workdir: Path,
    calibration: Feeds,
    analysis_feeds: Feeds,
    settings: Int8Settings,
    evaluate: Callable[[Path], AccuracyReport],
    adaptive: bool,
    max_steps: int,
    cache: Path,
    on_try: Callable[[str], None] | None,
    max_float_fraction: float = 0.5,
    budget_s: float = SEARCH_BUDGET_S,
) -> Int8Outcome:
    import onnx

    graph = onnx.load(str(fp32_model), load_external_data=False)
    total_nodes = len(graph.graph.node)
    excluded: list[str] = []
    kept: list[KeptInFloat] = []
    tries: list[dict[str, Any]] = []
    report: AccuracyReport | None = None
    head_done = False
    started = time.monotonic()
    for step in range(max_steps + 1):
        spent = time.monotonic() - started
        if step > 0 and spent > budget_s:
            stop = f"time budget spent ({spent:.0f} s of {budget_s:.0f} s) after {step} tries"
            log.info("int8: %s", stop)
            tries[-1]["stopped"] = stop
            break
        candidate = workdir / f"int8-step{step}.onnx"
        quantize_int8(fp32_model, candidate, calibration, settings, nodes_to_exclude=excluded, calibration_cache=cache)
        report = evaluate(candidate)
        tries.append(
            {"step": step, "nodes_in_float": len(excluded), "passed": report.passed, "summary": report.summary()}
        )
        log.info(
            "int8 try %d (%d nodes in float): %s", step, len(excluded), "passes" if report.passed else report.failures
        )
        if on_try:
            on_try(f"int8 try {step}: {len(excluded)} node(s) in float, {'passes' if report.passed else 'fails'}")
        if report.passed:
            return Int8Outcome(candidate, settings, report, kept, tries)
        if not adaptive or step == max_steps:
            tries[-1]["stopped"] = "not adaptive" if not adaptive else f"step budget spent ({max_steps} steps)"
            break
        if keep_mixed_scale_concats(report, lambda output: concat_nodes(graph, output), excluded, kept, step):
            continue
        if not head_done:
            head_done = True
            if keep_head_in_float(report, graph, excluded, kept, step):
                continue
        findings = analyse(fp32_model, candidate, analysis_feeds)
        if not keep_worst_in_float(findings, excluded, kept, step):
            log.info("int8: no quantized tensor left to keep in float")
            tries[-1]["stopped"] = "no quantized tensor left that the analysis charges with a loss"
            break
        if len(excluded) > max_float_fraction * total_nodes:
            stop = f"{len(excluded)} of {total_nodes} nodes would be float; int8 no longer pays"
            log.info("int8: %s", stop)
            tries[-1]["stopped"] = stop
            break
    return Int8Outcome(None, settings, report, kept, tries)


def head_nodes(proto: Any, output: str) -> tuple[str, ...]:
    """The probability-map head that makes graph output ``output``: from a squashing op (Sigmoid, Softmax)
    that produces it, back through single-input chains of head ops (:data:`_HEAD_OPS`; a second input
    that is a weight does not count) to the earliest upsampling op (Resize, ConvTranspose, ...) on that
    chain. Empty when the output is not squashed or no upsampling is found within 12 ops."""
    weights = {t.name for t in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output if out}
    node = producers.get(output)
    if node is None or node.op_type not in _SQUASH:
        return ()
    chain: list[str] = []
    last_upsample = 0
    for _ in range(12):
        if node is None or node.op_type not in _HEAD_OPS:
            break
        chain.append(node.name)
        if node.op_type in _UPSAMPLE:
            last_upsample = len(chain)
        data = [i for i in node.input if i and i not in weights and i in producers]
        if len(data) != 1:
            break
        node = producers.get(data[0])
    return tuple(chain[:last_upsample]) if last_upsample else ()


def keep_head_in_float(
    report: AccuracyReport, proto: Any, excluded: list[str], kept: list[KeptInFloat], step: int
) -> int:
    """For each failing float output made by a squashing activation through upsampling (:func:`head_nodes`),
    keep that head in float. Returns how many outputs it acted on."""
    failing = set(report.failing_outputs())
    added = 0
    for out in report.outputs:
        if out.name not in failing or out.kind == "integers":
            continue
        new = tuple(n for n in head_nodes(proto, out.name) if n not in excluded)
        if not new:
            continue
        excluded.extend(new)
        kept.append(
            KeptInFloat(
                new,
                f"output {out.name!r} is a probability map made by upsampling and a squashing activation: its "
                f"head ({len(new)} nodes) stays float, int8 logits lose most where the activation is steepest",
                step + 1,
            )
        )
        added += 1
    return added


def keep_mixed_scale_concats(
    report: AccuracyReport,
    nodes_of: Callable[[str], Sequence[str]],
    excluded: list[str],
    kept: list[KeptInFloat],
    step: int,
) -> int:
    """Before any analysis: an output that fails the bar in a slice (boxes in pixels joined with
    probabilities) gets the nodes that make it — its Concat and the producers of the Concat's inputs,
    ``nodes_of(output)`` — kept in float, since one int8 scale cannot hold slices of different scales.
    Returns how many outputs it acted on (0: nothing new to keep)."""
    added = 0
    by_name = {o.name: o for o in report.outputs}
    for output in report.failing_slices():
        new = tuple(n for n in nodes_of(output) if n not in excluded)
        if not new:
            continue
        scales = ", ".join(f"{s.start}:{s.end} ~{s.scale:.3g}" for s in by_name[output].slices)
        axis = by_name[output].slices[0].axis
        excluded.extend(new)
        kept.append(
            KeptInFloat(
                new,
                f"output {output!r} joins slices of different scales on axis {axis} ({scales}) and int8 with one "
                "scale loses the small ones: its concatenation and the tensors it joins stay float",
                step + 1,
            )
        )
        added += 1
    return added


def keep_worst_in_float(findings: Sequence[Any], excluded: list[str], kept: list[KeptInFloat], step: int) -> int:
    """Add the next worst findings' nodes to ``excluded`` (recorded in ``kept``); returns how many findings.

    ``findings`` come worst first, each with ``nodes`` and ``reason()``. Steps 0-3 keep one finding each;
    later steps double the batch (2, 4, ...), so a model with many sensitive spots converges in few tries.
    """
    batch = 1 if step < 4 else 2 ** (step - 3)
    added = 0
    for finding in findings:
        new = tuple(n for n in finding.nodes if n not in excluded)
        if not new:
            continue
        excluded.extend(new)
        kept.append(KeptInFloat(new, finding.reason(), step + 1))
        added += 1
        if added >= batch:
            break
    return added
