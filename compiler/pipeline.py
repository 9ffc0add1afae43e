"""The compiler's pipeline: ONNX model + data + target -> signed bundle, with accuracy checked on real data.

    load and check -> read data -> reference outputs -> optimize -> quantize / convert precision
        -> compare against the original -> self-test vectors -> write and sign the bundle

Each step is one module of this package with one job; :func:`compile_model` runs them in order, reports
each to a :class:`~edgepack.compiler.progress.Progress`, and returns a :class:`CompileResult` the CLI
prints. Everything is built in a temporary folder and the bundle is written by
:func:`edgepack.bundle.write_bundle`, which replaces the output file atomically: a failed compile leaves no
file behind (and an existing file at the output path untouched).

Precision: ``auto`` means the target's default. On an int8-default target the accuracy-aware search keeps
the nodes that hurt most in float until the bar holds, and falls back to fp16 (where the target has it)
and then fp32 only when that fails. An explicit ``--precision`` is never silently changed: if it cannot
meet the bar the compile fails with :class:`~edgepack.errors.AccuracyError` and the numbers.

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
from edgepack.compiler.accuracy_aware import Int8Outcome, KeptInFloat, search_int8
from edgepack.compiler.compare import AccuracyBar, AccuracyReport, compare_outputs
from edgepack.compiler.load import SourceModel, load_model, tensor_specs
from edgepack.compiler.node_errors import name_nodes
from edgepack.compiler.optimize import OptimizeResult, optimize
from edgepack.compiler.precision import to_fp16
from edgepack.compiler.progress import Progress
from edgepack.compiler.quantize_ort import Int8Settings, ensure_opset, has_const_matmul_without_conv
from edgepack.compiler.runner import run_on_host
from edgepack.compiler.selftest_vectors import write_selftest
from edgepack.compiler.speed import latency_ms
from edgepack.datasets import Samples, SampleSource, load_samples
from edgepack.errors import AccuracyError, ConfigError
from edgepack.manifest import Manifest, RuntimeRequirement
from edgepack.targets.registry import Precision, Target, get_target

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
_NAME_CLEAN = re.compile(r"[^A-Za-z0-9._-]+")


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
    timings: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="edgepack-compile-") as tmp_name:
        tmp = Path(tmp_name)
        with _timed(progress, "load and check model", timings) as step:
            source = load_model(request.model, target, request.input_shapes)
            step.detail(f"opset {source.opset}, {len(source.proto.graph.node)} nodes")
        with _timed(progress, "read data", timings) as step:
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

        source_path = tmp / "source.onnx"
        onnx.save(source.proto, str(source_path))
        with _timed(progress, "reference outputs (original model)", timings, total=len(evaluation)) as step:
            reference = run_on_host(
                source_path,
                source.inputs,
                source.outputs,
                evaluation.feeds,
                what="original model",
                on_sample=step.advance,
            )

        with _timed(progress, "optimize graph", timings) as step:
            optimized = optimize(source.proto, calibration.feeds)
            fp32_proto = optimized.proto
            name_nodes(fp32_proto)
            fp32_path = tmp / "fp32.onnx"
            onnx.save(fp32_proto, str(fp32_path))
            step.detail(f"{optimized.tool}: {optimized.nodes_before} -> {optimized.nodes_after} nodes")

        compiled_outputs: dict[Path, list[dict[str, np.ndarray]]] = {}

        def evaluate(path: Path, precision: Precision) -> AccuracyReport:
            plan = target.family.host_plan(target, precision=precision)
            outputs = run_on_host(
                path, source.inputs, source.outputs, evaluation.feeds, what="compiled model", execution=plan
            )
            compiled_outputs[path] = outputs
            return compare_outputs(
                reference, outputs, source.outputs, labels=evaluation.labels, bar=bar, data=data_note
            )

        attempts: list[dict[str, Any]] = []
        chosen: tuple[Precision, Path, AccuracyReport] | None = None
        outcome: Int8Outcome | None = None
        for precision in chain:
            if precision == "int8":
                with _timed(progress, "quantize int8 (accuracy-aware)", timings) as step:
                    outcome = _int8(target, fp32_path, tmp, calibration, lambda p: evaluate(p, "int8"), step.detail)
                    kept = len(outcome.nodes_in_float)
                    step.detail(("passes" if outcome.model else "fails the bar") + f", {kept} node(s) kept in float")
                attempts.append({"precision": "int8", "passed": outcome.model is not None, "tries": outcome.tries})
                if outcome.model is not None and outcome.report is not None:
                    chosen = ("int8", outcome.model, outcome.report)
                    break
            elif precision == "fp16":
                with _timed(progress, "convert to fp16", timings) as step:
                    fp16_path = tmp / "fp16.onnx"
                    onnx.save(to_fp16(fp32_proto), str(fp16_path))
                    report = evaluate(fp16_path, "fp16")
                    step.detail("passes" if report.passed else "fails the bar")
                attempts.append({"precision": "fp16", "passed": report.passed, "summary": report.summary()})
                if report.passed:
                    chosen = ("fp16", fp16_path, report)
                    break
            else:
                with _timed(progress, "check fp32", timings):
                    report = evaluate(fp32_path, "fp32")
                attempts.append({"precision": "fp32", "passed": report.passed, "summary": report.summary()})
                if report.passed:
                    chosen = ("fp32", fp32_path, report)
                    break
        if chosen is None:
            raise AccuracyError(_accuracy_message(target, requested, attempts, outcome))
        precision, compiled_path, report = chosen

        speed = None
        if precision == "int8" and not target.options.get("tensorrt"):
            with _timed(progress, "measure speed vs fp32", timings) as step:
                speed = _speed(fp32_path, compiled_path, evaluation.feeds[0])
                step.detail(f"{speed['speedup_1_thread']:.2f}x faster than fp32 (1 thread, this CPU)")

        with _timed(progress, "self-test vectors", timings) as step:
            n = min(request.selftest_samples, len(evaluation))
            vectors = write_selftest(tmp, evaluation.feeds[:n], compiled_outputs[compiled_path][:n], precision)
            step.detail(f"{n} samples, atol {vectors.selftest.atol:g}")

        with _timed(progress, "write and sign bundle", timings) as step:
            manifest = _write(
                request,
                target,
                source,
                precision,
                compiled_path,
                vectors,
                report,
                outcome,
                speed,
                keys,
                attempts,
                len(calibration),
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
        kept_in_float=list(outcome.kept_in_float) if outcome and precision == "int8" else [],
        speed=speed,
        optimize=optimized,
        fixed_shapes=source.fixed_shapes,
        attempts=attempts,
        timings=timings,
    )


# --- steps' helpers ------------------------------------------------------------------------------


def _int8(
    target: Target,
    fp32_path: Path,
    tmp: Path,
    calibration: Samples,
    evaluate: Any,
    note: Any,
) -> Int8Outcome:
    proto = onnx.load(str(fp32_path))
    ready = ensure_opset(proto)
    quant_input = fp32_path
    if ready is not proto:
        quant_input = tmp / "fp32-opset13.onnx"
        onnx.save(ready, str(quant_input))
    settings = Int8Settings.for_target(target)
    return search_int8(
        quant_input,
        tmp,
        calibration=calibration.feeds,
        analysis_feeds=calibration.feeds[:16],
        settings=settings,
        evaluate=evaluate,
        try_dynamic=not target.options.get("tensorrt") and has_const_matmul_without_conv(ready),
        on_try=note,
    )


def _speed(fp32: Path, compiled: Path, feed: Mapping[str, np.ndarray]) -> dict[str, Any]:
    fp32_ms = latency_ms(fp32, feed, threads=1, budget_s=0.5)
    int8_ms = latency_ms(compiled, feed, threads=1, budget_s=0.5)
    return {
        "host": "this build host's CPU, 1 thread, batch of one sample",
        "fp32_ms": round(fp32_ms, 4),
        "compiled_ms": round(int8_ms, 4),
        "speedup_1_thread": round(fp32_ms / int8_ms, 3) if int8_ms > 0 else None,
    }


def _write(
    request: CompileRequest,
    target: Target,
    source: SourceModel,
    precision: Precision,
    compiled_path: Path,
    vectors: Any,
    report: AccuracyReport,
    outcome: Int8Outcome | None,
    speed: dict[str, Any] | None,
    keys: list[Any],
    attempts: list[dict[str, Any]],
    calibration_count: int,
) -> Manifest:
    from edgepack.bundle import BundleFile, write_bundle

    compiled = onnx.load(str(compiled_path), load_external_data=False)
    opset = next(i.version for i in compiled.opset_import if i.domain in ("", "ai.onnx"))
    digest = hashlib.sha256(compiled_path.read_bytes()).hexdigest()
    quantization: dict[str, Any] | None = None
    if precision == "int8" and outcome is not None:
        import onnxruntime

        quantization = {
            "precision": "int8",
            "tool": f"onnxruntime {onnxruntime.__version__}",
            **outcome.settings.to_dict(),
            "calibration_samples": calibration_count,
            "nodes_in_float": outcome.nodes_in_float,
            "kept_in_float": [k.to_dict() for k in outcome.kept_in_float],
            "speed": speed,
        }
    elif precision == "fp16":
        import onnxruntime

        quantization = {
            "precision": "fp16",
            "tool": f"onnxruntime.transformers.float16 {onnxruntime.__version__}",
            "keep_io_types": True,
        }
    accuracy = {**report.to_dict(), "precision": precision, "attempts": _compact(attempts)}
    return write_bundle(
        Path(request.output),
        files=[
            BundleFile(MODEL_FILE, compiled_path, "model"),
            BundleFile(vectors.selftest.vectors, vectors.path, "selftest"),
        ],
        signers=keys,
        name=_bundle_name(request, source),
        version=request.version,
        target=target.name,
        runtime=RuntimeRequirement(name=target.runtime, version=target.family.runtime_version(target, opset=opset)),  # type: ignore[arg-type]
        model_file=MODEL_FILE,
        inputs=tensor_specs(compiled, "input"),
        outputs=tensor_specs(compiled, "output"),
        metadata=_metadata(source),
        execution=target.family.execution_plan(target, precision=precision, model_sha256=digest),
        quantization=quantization,
        accuracy=accuracy,
        selftest=vectors.selftest,
        source_sha256=source.sha256,
        toolchain=_toolchain(),
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


def _bundle_name(request: CompileRequest, source: SourceModel) -> str:
    if request.name:
        return request.name
    raw = source.metadata.get("name") or Path(request.model).stem
    cleaned = _NAME_CLEAN.sub("-", raw).strip("-._") or "model"
    return cleaned[:128]


def _metadata(source: SourceModel) -> dict[str, Any]:
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
    if source.proto.doc_string:
        meta.setdefault("description", source.proto.doc_string)
    return meta


def _toolchain() -> dict[str, str]:
    import onnxruntime
    import onnxslim

    return {
        "edgepack": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxslim": onnxslim.__version__,
        "numpy": np.__version__,
    }


def _compact(attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in a.items() if k != "tries"} | ({"tries": len(a["tries"])} if "tries" in a else {})
        for a in attempts
    ]


def _accuracy_message(
    target: Target, requested: str, attempts: list[dict[str, Any]], outcome: Int8Outcome | None
) -> str:
    lines = [f"no precision of target {target.name!r} met the accuracy bar (requested {requested}):"]
    for attempt in attempts:
        if attempt["precision"] == "int8" and outcome is not None and outcome.report is not None:
            lines.append(
                f"  int8 ({len(outcome.nodes_in_float)} nodes kept in float): {'; '.join(outcome.report.failures)}"
            )
        else:
            lines.append(f"  {attempt['precision']}: {attempt.get('summary', '')}")
    lines.append("loosen the bar with --max-accuracy-drop, or give validation data that matches the task")
    return "\n".join(lines)


class _timed:
    """A progress step that also records its duration in ``timings``."""

    def __init__(self, progress: Progress, name: str, timings: dict[str, float], total: int | None = None) -> None:
        self._cm = progress.step(name, total)
        self._name = name
        self._timings = timings

    def __enter__(self) -> Any:
        import time

        self._start = time.perf_counter()
        return self._cm.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        import time

        self._timings[self._name] = time.perf_counter() - self._start
        return self._cm.__exit__(*exc)
