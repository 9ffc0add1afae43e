"""The seam between the pipeline and a runtime family: a :class:`Converter` turns the float model into the
compiled artifact for one precision, and says how to run it on this host.

The pipeline (:mod:`edgepack.compiler.pipeline`) owns what every target shares — loading and checking the
source model, the data, the reference outputs of the original, graph optimization, the accuracy bar,
self-test vectors, writing and signing. A runtime family owns the rest, behind this interface:

* which source formats it converts (``source_formats``: ``"onnx"``, ``"tflite"``);
* for one precision, the conversion or quantization, *including* its own accuracy-aware search: it calls
  ``job.evaluate`` on each candidate it wants judged and keeps what passes;
* the payload files of the result (with roles), the name of the file the runtime loads, the input/output
  signature (with layouts where the converter changed them), the runtime version range it needs, what the
  manifest's ``quantization`` says, and which nodes stayed in float;
* how to run a candidate on this host (:class:`HostModel`: a runtime backend name from
  ``edgepack.runtimes`` and the host execution plan, i.e. ``target.family.host_plan``) — the pipeline runs
  it through the shared backends, so accuracy and self-test outputs come from the code the agent serves
  with;
* optionally a float baseline on the same runtime, so the pipeline can report the speed against fp32.

Contract (what a converter may rely on, and must keep):

1. ``job.model`` is a float32 model that computes what the user's model computes: for ``"onnx"`` the
   optimized graph (checked, shapes fixed for the target, nodes named, opset as the user exported it);
   for ``"tflite"`` the user's file as given. ``job.model.inputs``/``outputs`` are the source's signature;
   the compiled model must accept and return tensors of the same names (the evaluation feeds and reads
   them by name), though it may change layouts if it says so in ``CompiledModel.inputs`` and in the
   ``HostModel.inputs``/``outputs`` it is evaluated with (``layout``/``native_layout``).
2. ``job.evaluate(host_model)`` runs the candidate on the evaluation data with the backend
   ``host_model.runtime`` and ``host_model.execution``, compares it against the original's outputs and
   returns the :class:`~edgepack.compiler.compare.AccuracyReport` (``.passed`` is the bar). The pipeline
   keeps the outputs of every evaluated path, so self-test vectors of the chosen candidate cost nothing.
   Evaluate the exact file that goes into the bundle.
3. ``convert`` returns a :class:`Conversion`: ``compiled`` set when a candidate passed (and its
   ``report``), else ``compiled=None`` with the last failing report and the tries, and the pipeline moves
   to the next precision of the target's chain (``auto``) or fails with the numbers. Raise
   :class:`~edgepack.errors.UnsupportedModelError` (naming the node and the runtime's reason) when the
   model cannot be converted at all — never return a model that will fail on the device.
4. Everything is written under ``job.workdir`` (a temporary folder the pipeline deletes); the files named
   in ``CompiledModel.files`` must stay there until ``convert`` returns. Progress text goes to
   ``job.note``, logs to ``logging``.
5. A converter is found through its family: ``TargetFamily.converter`` is a ``"module:attribute"``
   string (the family module in ``targets/`` imports nothing of the compiler), resolved by
   :func:`converter_for`.

Adding a runtime family (see also ``docs/compiler.md``): a family module in ``targets/`` (targets,
``execution_plan``, ``host_plan``, ``runtime_version``, ``unsupported_nodes``, ``converter``), one line
in ``targets/registry.py``'s ``FAMILY_MODULES``, and a converter module in ``compiler/`` implementing
:class:`Converter`. The pipeline does not change.

Usage (what the pipeline does)::

    converter = converter_for(target)
    conversion = converter.convert(ConvertJob(target, "int8", float_model, calibration, evaluate, tmp, note))
    if conversion.compiled is not None:
        outputs = run_host_model(conversion.compiled.host, inputs, outputs, feeds)
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from edgepack.bundle import BundleFile
from edgepack.compiler.accuracy_aware import KeptInFloat
from edgepack.compiler.compare import AccuracyReport
from edgepack.compiler.speed import median_ms
from edgepack.datasets import Samples
from edgepack.errors import ModelRunError, RuntimeBackendError, UnsupportedModelError
from edgepack.manifest import TensorSpec
from edgepack.runtimes.base import LoadedModel, RuntimeOptions, get_backend
from edgepack.targets.registry import Precision, Target

log = logging.getLogger(__name__)

SourceFormat = Literal["onnx", "tflite"]
Feeds = Sequence[Mapping[str, np.ndarray]]

__all__ = [
    "CompiledModel",
    "Conversion",
    "ConvertJob",
    "Converter",
    "FloatModel",
    "HostModel",
    "KeptInFloat",
    "SourceFormat",
    "converter_for",
    "host_latency_ms",
    "load_host_model",
    "run_host_model",
]


@dataclass(frozen=True)
class FloatModel:
    """The float32 model a converter starts from (see the contract, point 1)."""

    path: Path
    format: SourceFormat
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int | None = None  # ONNX default-domain opset; None for other formats


@dataclass(frozen=True)
class HostModel:
    """A model file and how to run it on this host: a runtime backend and its host execution plan.

    ``inputs``/``outputs``: the signature to load it with when it is not the source's — a converter that
    changed layouts (NCHW -> NHWC) gives its specs with ``layout``/``native_layout`` so the backend
    transposes at the edge; the tensors keep the source's names either way. None: the source's.
    """

    path: Path
    runtime: str  # an edgepack.runtimes backend name: "onnxruntime", "openvino", "litert"
    execution: Mapping[str, Any] = field(default_factory=dict)
    inputs: Sequence[TensorSpec] | None = None
    outputs: Sequence[TensorSpec] | None = None


@dataclass
class CompiledModel:
    """What goes into the bundle for the chosen candidate.

    ``files``: every payload file the runtime needs, with roles (``"model"`` for the file it loads,
    ``"weights"`` for e.g. an OpenVINO ``.bin``); ``model_file`` is the bundle path of the ``"model"`` one.
    ``inputs``/``outputs``: the manifest's signature. ``runtime_version``: a PEP 440 range.
    ``quantization``: the manifest's ``quantization`` entry (tool, method, settings, nodes in float); the
    pipeline adds ``calibration_samples`` and ``speed``. ``execution`` is not here: the pipeline asks
    ``target.family.execution_plan`` with the model file's digest.
    """

    host: HostModel
    files: list[BundleFile]
    model_file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    runtime_version: str
    quantization: dict[str, Any] | None = None
    kept_in_float: list[KeptInFloat] = field(default_factory=list)

    @property
    def nodes_in_float(self) -> list[str]:
        return [n for k in self.kept_in_float for n in k.nodes]


@dataclass
class Conversion:
    """The converter's answer for one precision.

    ``compiled``: the candidate that passed, or None. ``report``: its accuracy report (or the last failing
    one). ``tries``: one dict per candidate judged (``step``, ``nodes_in_float``, ``passed``, ``summary``,
    anything else worth keeping), shown in the manifest's ``accuracy.attempts``. ``kept_in_float``: the
    nodes the accuracy-aware search kept in float (also when it failed, for the error message).
    ``baseline``: the float model on the same runtime and device, for the speed comparison (None: do not
    measure, e.g. the host CPU says nothing about the device's accelerator). ``failure``: set by the
    pipeline when the quantizer itself failed and ``auto`` fell back (no candidate was judged).
    """

    precision: Precision
    compiled: CompiledModel | None
    report: AccuracyReport | None
    tries: list[dict[str, Any]] = field(default_factory=list)
    kept_in_float: list[KeptInFloat] = field(default_factory=list)
    baseline: HostModel | None = None
    failure: str | None = None

    @property
    def passed(self) -> bool:
        return self.compiled is not None

    @classmethod
    def single_try(
        cls, job: ConvertJob, precision: Precision, host: HostModel, build: Callable[[], CompiledModel]
    ) -> Conversion:
        """One candidate, no search: judge ``host`` by the bar and ``build`` the compiled model if it passes."""
        report = job.evaluate(host)
        compiled = build() if report.passed else None
        tries = [{"step": 0, "passed": report.passed, "summary": report.summary()}]
        return cls(precision, compiled, report, tries)

    @property
    def nodes_in_float(self) -> list[str]:
        return [n for k in self.kept_in_float for n in k.nodes]


@dataclass
class ConvertJob:
    """One conversion: the target, the precision to produce, the float model, the user's calibration
    samples, the accuracy callback (contract, point 2), a scratch folder and a progress line."""

    target: Target
    precision: Precision
    model: FloatModel
    calibration: Samples
    evaluate: Callable[[HostModel], AccuracyReport]
    workdir: Path
    note: Callable[[str], None] = lambda _text: None


class Converter(Protocol):
    """A runtime family's compiler side. Stateless; one module-level instance per family."""

    runtime: str  # the manifest's runtime name
    source_formats: tuple[SourceFormat, ...]

    def convert(self, job: ConvertJob) -> Conversion:
        """Produce ``job.precision`` for ``job.target`` from ``job.model`` (see the module contract)."""
        ...

    def latency_ms(self, model: HostModel, feed: Mapping[str, np.ndarray], *, threads: int, budget_s: float) -> float:
        """Median milliseconds of one inference of ``model`` on ``feed`` on this host's CPU."""
        ...

    def toolchain(self) -> dict[str, str]:
        """Names and versions of the tools this converter used (merged into the manifest's toolchain)."""
        ...


def converter_for(target: Target) -> Converter:
    """The converter of ``target``'s family (``TargetFamily.converter``, ``"module:attribute"``)."""
    ref = getattr(target.family, "converter", None)
    if not ref:
        raise UnsupportedModelError(
            f"target {target.name!r} ({target.runtime}) has no compiler converter; "
            "its family module must name one in `converter`"
        )
    module_name, _, attribute = str(ref).partition(":")
    converter: Converter = getattr(importlib.import_module(module_name), attribute)
    return converter


def load_host_model(
    model: HostModel,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    threads: int | None = None,
    what: str = "model",
) -> LoadedModel:
    """``model`` loaded with its backend on this host's CPU (accelerators off: results must reproduce), with
    ``model``'s own signature where it has one, else ``inputs``/``outputs`` (the source's)."""
    backend = get_backend(model.runtime)
    try:
        return backend.load(
            model.path,
            inputs=list(model.inputs if model.inputs is not None else inputs),
            outputs=list(model.outputs if model.outputs is not None else outputs),
            execution=dict(model.execution),
            options=RuntimeOptions(threads=threads, allow_accelerators=False),
        )
    except RuntimeBackendError as exc:
        raise UnsupportedModelError(f"{model.runtime} cannot load the {what}: {exc}") from exc


def run_host_model(
    model: HostModel,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    feeds: Feeds,
    *,
    what: str = "model",
    on_sample: Callable[[], None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Outputs of ``model`` for every feed, computed with its runtime backend on this host."""
    loaded = load_host_model(model, inputs, outputs, what=what)
    try:
        results = []
        for feed in feeds:
            try:
                results.append(loaded.infer(feed))
            except RuntimeBackendError as exc:
                raise ModelRunError(f"{model.runtime} cannot run the {what}: {exc}") from exc
            if on_sample is not None:
                on_sample()
        return results
    finally:
        loaded.close()


def host_latency_ms(
    model: HostModel,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    feed: Mapping[str, np.ndarray],
    *,
    threads: int = 1,
    budget_s: float = 1.0,
    min_runs: int = 5,
) -> float:
    """Median milliseconds per inference through the shared backend (a converter's default ``latency_ms``)."""
    loaded = load_host_model(model, inputs, outputs, threads=threads)
    try:
        return median_ms(lambda: loaded.infer(feed), budget_s=budget_s, min_runs=min_runs)
    finally:
        loaded.close()
