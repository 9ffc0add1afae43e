"""The compiler's pipeline: model + data + target -> signed bundle, with accuracy checked on real data.

    load and check -> read data -> reference outputs -> optimize -> quantize / convert (the family's)
        -> compare against the original -> self-test vectors -> write and sign the bundle

Each step is one module of this package with one job; :func:`compile_model` runs them in order, reports
each to a :class:`~edgepack.compiler.progress.Progress`, and returns a :class:`CompileResult` the CLI
prints. Everything is built in a temporary folder and the bundle is written by
:func:`edgepack.bundle.write_bundle`, which replaces the output file atomically: a failed compile leaves no
file behind (and an existing file at the output path untouched).

The pipeline knows no runtime. The source is an ONNX model (checked, shapes fixed, optimized) or a
``.tflite`` file (for families that read TFLite); the quantize/convert step and the way a candidate runs on
this host come from the target's family through :mod:`edgepack.compiler.family` (a ``Converter``: the
ONNX Runtime one in :mod:`~edgepack.compiler.onnxruntime_convert`, OpenVINO's in
:mod:`~edgepack.compiler.openvino_convert`). The pipeline hands the converter an ``evaluate`` callback that
runs a candidate with the shared runtime backend, compares it against the original's outputs and holds it
to the bar; the outputs of the chosen candidate become its self-test vectors.

Precision: ``auto`` means the target's default. On an int8-default target the converter's accuracy-aware
search keeps the nodes that hurt most in float until the bar holds, and the pipeline falls back to fp16
(where the target has it) and then fp32 only when that fails. An explicit ``--precision`` is never
silently changed: if it cannot meet the bar the compile fails with :class:`~edgepack.errors.AccuracyError`
and the numbers.

Usage::

    result = compile_model(CompileRequest(model=Path("model.onnx"), target="x86",
                                          calibration="calib.npz", keys=[Path("dev.key")],
                                          output=Path("model.epk")))
    result.precision, result.accuracy.passed, result.manifest.name
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import semver

from edgepack import __version__
from edgepack.compiler.accuracy_aware import KeptInFloat
from edgepack.compiler.compare import AccuracyBar, AccuracyReport, compare_outputs
from edgepack.compiler.family import (
    CompiledModel,
    Conversion,
    Converter,
    ConvertJob,
    FloatModel,
    HostModel,
    converter_for,
    run_host_model,
)
from edgepack.compiler.load import SourceModel, load_model
from edgepack.compiler.load_tflite import TfliteSource, is_tflite, load_tflite
from edgepack.compiler.node_errors import name_nodes
from edgepack.compiler.optimize import OptimizeResult, optimize
from edgepack.compiler.output_slices import find_slices, parse_output_slices
from edgepack.compiler.progress import Progress
from edgepack.compiler.reference_stats import write_reference_stats
from edgepack.compiler.runner import CPU_PLAN
from edgepack.compiler.selftest_vectors import write_selftest
from edgepack.datasets import SampleSource, load_samples
from edgepack.errors import AccuracyError, CompileError, ConfigError, EdgepackError, ModelRunError, QuantizerError
from edgepack.manifest import Manifest, RuntimeRequirement
from edgepack.targets.registry import Precision, Target, get_target

log = logging.getLogger(__name__)

Source = SourceModel | TfliteSource
_NAME_CLEAN = re.compile(r"[^A-Za-z0-9._-]+")
# auto trades an int8 result that runs slower than fp32 for fp32 only where fp32 takes at least this long per
# inference on this host: below it the timing is mostly call overhead and noise, and the choice would flip
# from run to run (the int8 result is kept, with the speed warning).
AUTO_SPEED_MIN_MS = 0.2


@dataclass
class CompileRequest:
    """Everything one compile needs. ``keys`` are key files or loaded SigningKeys."""

    model: Path
    target: str
    calibration: SampleSource
    output: Path
    keys: Sequence[Any]
    validation: SampleSource | None = None
    precision: str = "auto"
    input_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    name: str | None = None
    version: str = "0.1.0"
    max_accuracy_drop: float = 1.0
    selftest_samples: int = 8
    max_calibration_samples: int = 512
    expires_at: datetime | None = None
    # outputs to judge per slice: "NAME:AXIS:START-END,START-END" (else found from the graph and the values)
    output_slices: Sequence[str] = ()


@dataclass
class CompileResult:
    """What was built and what was measured; ``to_dict`` is what ``--json`` prints."""

    output: Path
    manifest: Manifest
    target: str
    precision: str
    requested_precision: str
    accuracy: AccuracyReport
    quantization: dict[str, Any] | None
    kept_in_float: list[KeptInFloat]
    speed: dict[str, Any] | None
    optimize: OptimizeResult
    fixed_shapes: dict[str, list[int]]
    attempts: list[dict[str, Any]]
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "name": self.manifest.name,
            "version": self.manifest.version,
            "target": self.target,
            "precision": self.precision,
            "requested_precision": self.requested_precision,
            "accuracy": self.accuracy.to_dict(),
            "kept_in_float": [k.to_dict() for k in self.kept_in_float],
            "speed": self.speed,
            "optimize": self.optimize.to_dict(),
            "fixed_shapes": self.fixed_shapes,
            "attempts": self.attempts,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


def compile_model(request: CompileRequest, progress: Progress | None = None) -> CompileResult:
    """Compile ``request.model`` for ``request.target`` and write the signed bundle to ``request.output``."""
    progress = progress or Progress()
    target = get_target(request.target)
    converter = converter_for(target)
    requested = request.precision.lower()
    chain = _precision_chain(target, requested)
    _check_version(request.version)
    keys = _load_keys(request.keys)
    output = Path(request.output)
    if output.is_dir():
        raise ConfigError(f"output {output} is a folder; give a file name such as {output / 'model.epk'}")
    if not 0.0 <= request.max_accuracy_drop <= 100.0:
        raise ConfigError(f"--max-accuracy-drop {request.max_accuracy_drop:g}: give points between 0 and 100")
    bar = AccuracyBar.from_max_drop(request.max_accuracy_drop)
    slice_overrides = parse_output_slices(request.output_slices)
    timings: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="edgepack-compile-") as tmp_name:
        tmp = Path(tmp_name)
        with _timed(progress, "load and check model", timings, model=request.model) as step:
            source: Source
            if is_tflite(Path(request.model)):
                source = load_tflite(request.model, target, converter.source_formats, request.input_shapes)
                step.detail(f"TFLite, {len(source.inputs)} input(s)")
            else:
                source = load_model(request.model, target, request.input_shapes)
                step.detail(f"opset {source.opset}, {len(source.proto.graph.node)} nodes")
        with _timed(progress, "read data", timings, model=request.model) as step:
            calibration = load_samples(
                request.calibration, source.inputs, what="calibration data", limit=request.max_calibration_samples
            )
            if request.validation is not None:
                evaluation = load_samples(request.validation, source.inputs, what="validation data")
                data_note = f"validation data ({evaluation.origin})"
            else:
                evaluation = calibration
                data_note = f"calibration data ({calibration.origin}; no validation data given)"
            step.detail(f"{len(calibration)} calibration, {len(evaluation)} evaluation samples")

        if isinstance(source, TfliteSource):
            reference_model = source.reference
        else:
            source_path = tmp / "source.onnx"
            onnx.save(source.proto, str(source_path))
            reference_model = HostModel(source_path, "onnxruntime", CPU_PLAN)
        reference_step = "reference outputs (original model)"
        with _timed(progress, reference_step, timings, model=request.model, total=len(evaluation)) as step:
            reference = run_host_model(
                reference_model,
                source.inputs,
                source.outputs,
                evaluation.feeds,
                what="original model",
                on_sample=step.advance,
            )
            # outputs of mixed scales (boxes in pixels joined with probabilities) are judged per slice too
            slices = find_slices(
                reference, source.outputs, source.proto if isinstance(source, SourceModel) else None, slice_overrides
            )
            if slices:
                step.detail("judged per slice: " + ", ".join(f"{n} ({s.source})" for n, s in slices.items()))
        if reference_model.runtime != "onnxruntime":
            data_note += f"; reference outputs by {reference_model.runtime}"

        optimized: OptimizeResult | None = None
        if isinstance(source, TfliteSource):
            float_model = FloatModel(source.path, "tflite", source.inputs, source.outputs)
        else:
            with _timed(progress, "optimize graph", timings, model=request.model) as step:
                optimized = optimize(source.proto, calibration.feeds)
                fp32_proto = optimized.proto
                name_nodes(fp32_proto)
                fp32_path = tmp / "fp32.onnx"
                onnx.save(fp32_proto, str(fp32_path))
                step.detail(f"{optimized.tool}: {optimized.nodes_before} -> {optimized.nodes_after} nodes")
            float_model = FloatModel(fp32_path, "onnx", source.inputs, source.outputs, opset=source.opset)

        compiled_outputs: dict[Path, list[dict[str, np.ndarray]]] = {}

        def evaluate(model: HostModel) -> AccuracyReport:
            outputs = run_host_model(model, source.inputs, source.outputs, evaluation.feeds, what="compiled model")
            compiled_outputs[Path(model.path)] = outputs[: request.selftest_samples]  # all the self-test needs
            return compare_outputs(
                reference, outputs, source.outputs, labels=evaluation.labels, bar=bar, data=data_note, slices=slices
            )

        attempts: list[dict[str, Any]] = []
        conversions: list[Conversion] = []
        chosen: Conversion | None = None
        for index, precision in enumerate(chain):
            with _timed(progress, _STEP_NAMES[precision], timings, model=request.model) as step:
                job = ConvertJob(target, precision, float_model, calibration, evaluate, tmp, step.detail)
                try:
                    conversion = _convert(converter, job, _STEP_NAMES[precision], Path(request.model))
                except (QuantizerError, ModelRunError) as exc:
                    if index == len(chain) - 1:
                        raise
                    # auto: the quantizer crashing, or its result not running, is one more reason to fall back
                    log.warning("%s; trying %s", exc, chain[index + 1])
                    failed = "the quantizer failed" if isinstance(exc, QuantizerError) else "the result does not run"
                    step.detail(f"{failed}; trying {chain[index + 1]}")
                    conversion = Conversion(precision, None, None, failure=str(exc))
                conversions.append(conversion)
                verdict = "passes" if conversion.passed else "fails the bar"
                if precision == "int8":
                    verdict += f", {len(conversion.nodes_in_float)} node(s) kept in float"
                step.detail(verdict)
            attempts.append(_attempt(conversion))
            if conversion.compiled is not None:
                chosen = conversion
                break
        if chosen is None or chosen.compiled is None or chosen.report is None:
            raise AccuracyError(_accuracy_message(target, requested, conversions))
        precision, compiled, report = chosen.precision, chosen.compiled, chosen.report

        speed = None
        if chosen.baseline is not None:
            with _timed(progress, "measure speed vs fp32", timings, model=request.model) as step:
                speed = _speed(converter, chosen.baseline, compiled.host, evaluation.feeds[0])
                step.detail(f"{speed['speedup_1_thread']:.2f}x faster than fp32 (1 thread, this CPU)")
            if speed["speedup_1_thread"] is not None and speed["speedup_1_thread"] < 1.0:
                # kept, as asked (auto falls back only for accuracy), but said: a user after speed should know
                kept = f", {len(chosen.nodes_in_float)} node(s) kept in float" if chosen.nodes_in_float else ""
                speed["warning"] = (
                    f"{precision} runs slower than fp32 on this host ({speed['speedup_1_thread']:.2f}x, 1 thread"
                    f"{kept}); if speed matters more than size, compile with --precision fp32"
                )
                log.warning("%s", speed["warning"])
                if (
                    requested == "auto"
                    and precision == "int8"
                    and "fp32" in target.precisions
                    and speed["fp32_ms"] >= AUTO_SPEED_MIN_MS
                ):
                    # auto asked for the target's best; int8 that is not faster than fp32 is not that
                    with _timed(progress, _STEP_NAMES["fp32"], timings, model=request.model) as step:
                        job = ConvertJob(target, "fp32", float_model, calibration, evaluate, tmp, step.detail)
                        fallback = _convert(converter, job, _STEP_NAMES["fp32"], Path(request.model))
                        step.detail("passes" if fallback.passed else "fails the bar")
                    if fallback.compiled is not None and fallback.report is not None:
                        attempts[-1]["rejected"] = (
                            f"int8 passes the bar but runs at {speed['speedup_1_thread']:.2f}x fp32 on this host "
                            f"(1 thread{kept}), so auto picked fp32; compile with --precision int8 to keep int8"
                        )
                        attempts[-1]["speed"] = speed
                        log.warning("%s", attempts[-1]["rejected"])
                        attempts.append(_attempt(fallback))
                        chosen, speed = fallback, None
                        precision, compiled, report = chosen.precision, fallback.compiled, fallback.report

        with _timed(progress, "self-test vectors", timings, model=request.model) as step:
            n = min(request.selftest_samples, len(evaluation))
            outputs = compiled_outputs[Path(compiled.host.path)][:n]
            vectors = write_selftest(tmp, evaluation.feeds[:n], outputs, precision)
            step.detail(f"{n} samples, atol {vectors.selftest.atol:g}")

        with _timed(progress, "reference statistics", timings, model=request.model) as step:
            refstats_path, refstats = write_reference_stats(tmp, calibration, source.inputs, source.outputs, reference)
            step.detail(f"{len(refstats.inputs)} input(s), {len(refstats.outputs)} output(s) summarised")

        with _timed(progress, "write and sign bundle", timings, model=request.model) as step:
            manifest = _write(
                request,
                target,
                converter,
                source,
                precision,
                compiled,
                vectors,
                report,
                speed,
                keys,
                attempts,
                len(calibration),
                refstats_path,
            )
            step.detail(f"{output} ({output.stat().st_size} bytes)")

    return CompileResult(
        output=output,
        manifest=manifest,
        target=target.name,
        precision=precision,
        requested_precision=requested,
        accuracy=report,
        quantization=manifest.quantization,
        kept_in_float=list(compiled.kept_in_float),
        speed=speed,
        optimize=optimized or OptimizeResult(onnx.ModelProto(), "none", 0, 0, "TFLite source: not an ONNX graph"),
        fixed_shapes=source.fixed_shapes,
        attempts=attempts,
        timings=timings,
    )


# --- steps' helpers ------------------------------------------------------------------------------

_STEP_NAMES: dict[str, str] = {
    "int8": "quantize int8 (accuracy-aware)",
    "fp16": "convert to fp16",
    "fp32": "check fp32",
}


def _attempt(conversion: Conversion) -> dict[str, Any]:
    attempt: dict[str, Any] = {"precision": conversion.precision, "passed": conversion.passed}
    if conversion.failure is not None:
        attempt["error"] = conversion.failure
    elif conversion.precision == "int8":
        attempt["tries"] = conversion.tries
    elif conversion.report is not None:
        attempt["summary"] = conversion.report.summary()
    return attempt


def _speed(
    converter: Converter, fp32: HostModel, compiled: HostModel, feed: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    fp32_ms = converter.latency_ms(fp32, feed, threads=1, budget_s=0.5)
    int8_ms = converter.latency_ms(compiled, feed, threads=1, budget_s=0.5)
    return {
        "host": "this build host's CPU, 1 thread, batch of one sample",
        "runtime": converter.runtime,
        "fp32_ms": round(fp32_ms, 4),
        "compiled_ms": round(int8_ms, 4),
        "speedup_1_thread": round(fp32_ms / int8_ms, 3) if int8_ms > 0 else None,
    }


def _write(
    request: CompileRequest,
    target: Target,
    converter: Converter,
    source: Source,
    precision: Precision,
    compiled: CompiledModel,
    vectors: Any,
    report: AccuracyReport,
    speed: dict[str, Any] | None,
    keys: list[Any],
    attempts: list[dict[str, Any]],
    calibration_count: int,
    refstats: Path | None = None,
) -> Manifest:
    from edgepack.bundle import BundleFile, write_bundle
    from edgepack.refstats import METADATA_KEY

    model_source = next(f.source for f in compiled.files if f.path == compiled.model_file)
    digest = hashlib.sha256(Path(model_source).read_bytes()).hexdigest()
    quantization: dict[str, Any] | None = None
    if compiled.quantization is not None:
        quantization = dict(compiled.quantization)
        if precision == "int8":
            quantization["calibration_samples"] = calibration_count
            quantization["speed"] = speed
    accuracy = {**report.to_dict(), "precision": precision, "attempts": _compact(attempts)}
    return write_bundle(
        Path(request.output),
        files=[
            *compiled.files,
            BundleFile(vectors.selftest.vectors, vectors.path, "selftest"),
            *([BundleFile(refstats.name, refstats, "aux")] if refstats else []),
        ],
        signers=keys,
        name=_bundle_name(request, source),
        version=request.version,
        target=target.name,
        runtime=RuntimeRequirement(name=converter.runtime, version=compiled.runtime_version),  # type: ignore[arg-type]
        model_file=compiled.model_file,
        inputs=compiled.inputs,
        outputs=compiled.outputs,
        metadata={**_metadata(source), **({METADATA_KEY: refstats.name} if refstats else {})},
        execution=target.family.execution_plan(target, precision=precision, model_sha256=digest),
        quantization=quantization,
        accuracy=accuracy,
        selftest=vectors.selftest,
        source_sha256=source.sha256,
        toolchain=_toolchain(converter),
        expires_at=request.expires_at,
    )


def _precision_chain(target: Target, requested: str) -> list[Precision]:
    if requested == "auto":
        default = target.default_precision
        fallbacks = [p for p in ("fp16", "fp32") if p in target.precisions and p != default]
        if default == "fp32":
            fallbacks = []
        return [default, *fallbacks]
    if requested not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"--precision {requested!r}: choose auto, fp32, fp16 or int8")
    return [target.check_precision(requested)]


def _check_version(version: str) -> None:
    if not semver.Version.is_valid(version):
        raise ConfigError(f"--version {version!r} is not a semantic version such as 1.2.0")


def _load_keys(keys: Sequence[Any]) -> list[Any]:
    from edgepack.keys import SigningKey

    if not keys:
        raise ConfigError("no signing key given; pass --key KEY (create one with `edgepack keys generate`)")
    return [k if isinstance(k, SigningKey) else SigningKey.load(Path(k)) for k in keys]


def _bundle_name(request: CompileRequest, source: Source) -> str:
    if request.name:
        return request.name
    raw = source.metadata.get("name") or Path(request.model).stem
    cleaned = _NAME_CLEAN.sub("-", raw).strip("-._") or "model"
    return cleaned[:128]


def _metadata(source: Source) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in source.metadata.items():
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        # structured values (labels, preprocessing) are stored as JSON; everything else as the text it is
        meta[key] = parsed if isinstance(parsed, (list, dict)) else value
    meta["source_file"] = source.path.name
    if source.fixed_shapes:
        meta["fixed_shapes"] = source.fixed_shapes
    if isinstance(source, SourceModel) and source.proto.doc_string:
        meta.setdefault("description", source.proto.doc_string)
    return meta


def _toolchain(converter: Converter) -> dict[str, str]:
    import onnxslim

    return {
        "edgepack": __version__,
        "onnx": onnx.__version__,
        "onnxslim": onnxslim.__version__,
        "numpy": np.__version__,
        **converter.toolchain(),
    }


def _compact(attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in a.items() if k != "tries"} | ({"tries": len(a["tries"])} if "tries" in a else {})
        for a in attempts
    ]


def _accuracy_message(target: Target, requested: str, conversions: list[Conversion]) -> str:
    lines = [f"no precision of target {target.name!r} met the accuracy bar (requested {requested}):"]
    for conversion in conversions:
        report = conversion.report
        if conversion.failure is not None:
            lines.append(f"  {conversion.precision}: {conversion.failure}")
        elif conversion.precision == "int8" and report is not None:
            kept = len(conversion.nodes_in_float)
            lines.append(f"  int8 ({kept} nodes kept in float): {'; '.join(report.failures)}")
        else:
            lines.append(f"  {conversion.precision}: {report.summary() if report is not None else ''}")
    lines.append("loosen the bar with --max-accuracy-drop, or give validation data that matches the task")
    return "\n".join(lines)


def _convert(converter: Converter, job: ConvertJob, step: str, model: Path) -> Conversion:
    """``converter.convert(job)``; an unexpected failure of a tool it drives becomes an error that names the
    step and the model: a :class:`QuantizerError` for int8/fp16 (so ``auto`` records it and falls back to a
    float precision), a :class:`CompileError` for fp32 (nothing left to fall back to)."""
    try:
        return converter.convert(job)
    except EdgepackError:
        raise
    except Exception as exc:  # the boundary: a third-party tool's own exception types
        log.info("%s failed", step, exc_info=True)
        message = unexpected_failure(step, model, exc)
        if job.precision == "fp32":
            raise CompileError(message) from exc
        raise QuantizerError(f"{message}; or compile with --precision fp32") from exc


def unexpected_failure(step: str, model: Path, exc: BaseException) -> str:
    """The message for an exception no edgepack code turned into an error of its own: which step, which
    model, the exception, and how to get the traceback."""
    text = " ".join(str(exc).split())
    if len(text) > 400:
        text = text[:400] + " ..."
    return (
        f"step '{step}' failed on {model.name}: {type(exc).__name__}: {text or '(no message)'} "
        "(an unexpected failure of edgepack or a tool it uses; rerun with --verbose for the traceback and report it)"
    )


class _timed:
    """A progress step that also records its duration in ``timings``.

    The boundary of a compile step: an exception that is not an :class:`EdgepackError` (a third-party tool
    failing in a way the step's own code did not foresee) leaves it as a :class:`CompileError` naming the
    step and the model, so no compile ends in a traceback; ``--verbose`` logs the traceback.
    """

    def __init__(
        self,
        progress: Progress,
        name: str,
        timings: dict[str, float],
        total: int | None = None,
        model: Path | None = None,
    ) -> None:
        self._cm = progress.step(name, total)
        self._name = name
        self._timings = timings
        self._model = Path(model) if model is not None else Path("the model")

    def __enter__(self) -> Any:
        import time

        self._start = time.perf_counter()
        return self._cm.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        import time

        self._timings[self._name] = time.perf_counter() - self._start
        suppressed = self._cm.__exit__(*exc)
        error = exc[1]
        if isinstance(error, Exception) and not isinstance(error, EdgepackError) and not suppressed:
            log.info("%s failed", self._name, exc_info=error)
            raise CompileError(unexpected_failure(self._name, self._model, error)) from error
        return suppressed
