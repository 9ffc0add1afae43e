"""Self-test vectors: the compiler writes them, the agent replays them before a bundle goes live.

A vector file is an ``.npz`` (no pickles) holding, for S samples, ``input.<name>`` arrays of shape
``[S] + <one inference's input shape>`` and ``output.<name>`` arrays of shape ``[S] + <output shape>``:
what the compiler fed the model and what the compiled model answered on the build host. On the device
the same inputs must give the same outputs within the manifest's tolerance, elementwise
``|got - expected| <= atol + rtol * |expected|`` (``np.allclose``'s rule; a NaN must meet a NaN; strings
must be equal).

    write_vectors(path, inputs, outputs)              # compiler: one dict per sample
    report = run_selftest(model, path, atol, rtol)    # agent: SelfTestError when a sample differs
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepack.errors import InferenceInputError, SelfTestError
from edgepack.runtimes.base import LoadedModel

log = logging.getLogger(__name__)

INPUT_PREFIX = "input."
OUTPUT_PREFIX = "output."

Sample = dict[str, np.ndarray]


@dataclass(frozen=True)
class Mismatch:
    """The worst element of one output in one sample that is outside the tolerance."""

    sample: int
    output: str
    max_abs_diff: float
    allowed: float  # atol + rtol * |expected| at the worst element
    reason: str | None = None  # set when the values cannot be compared numerically

    def __str__(self) -> str:
        where = f"sample {self.sample}, output {self.output!r}"
        if self.reason:
            return f"{where}: {self.reason}"
        return f"{where}: |diff| {self.max_abs_diff:.6g} exceeds the allowed {self.allowed:.6g}"


@dataclass
class SelfTestReport:
    """What a self-test run measured: per output, the largest absolute difference over all samples."""

    samples: int
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.mismatches


def write_vectors(
    path: Path, inputs: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[Mapping[str, np.ndarray]]
) -> None:
    """Write S samples (one dict of arrays per sample) to ``path`` atomically.

    Raises ValueError when the samples disagree with each other (names, shapes, dtypes) or hold
    objects numpy cannot store without pickling.
    """
    if not inputs or len(inputs) != len(outputs):
        raise ValueError(
            f"need at least one sample and one outputs dict per inputs dict; "
            f"got {len(inputs)} inputs and {len(outputs)} outputs"
        )
    arrays = {**_stack(INPUT_PREFIX, inputs), **_stack(OUTPUT_PREFIX, outputs)}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, allow_pickle=False, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_vectors(path: Path) -> tuple[list[Sample], list[Sample]]:
    """The samples in ``path``: (inputs, outputs), one dict per sample. SelfTestError when malformed."""
    arrays = _load(Path(path))
    inputs = {k[len(INPUT_PREFIX) :]: v for k, v in arrays.items() if k.startswith(INPUT_PREFIX)}
    outputs = {k[len(OUTPUT_PREFIX) :]: v for k, v in arrays.items() if k.startswith(OUTPUT_PREFIX)}
    stray = sorted(k for k in arrays if not k.startswith((INPUT_PREFIX, OUTPUT_PREFIX)))
    if stray or not inputs or not outputs or "" in inputs or "" in outputs:
        raise SelfTestError(
            f"self-test vectors {Path(path).name} must hold 'input.<name>' and 'output.<name>' arrays "
            f"(at least one of each); found {sorted(arrays)}"
        )
    counts = {name: value.shape[0] if value.ndim else 0 for name, value in arrays.items()}
    samples = min(counts.values())
    if samples < 1 or len(set(counts.values())) != 1:
        raise SelfTestError(
            f"self-test vectors {Path(path).name}: every array must have the same number of samples "
            f"(>= 1) along its first axis; found {counts}"
        )
    return _split(inputs, samples), _split(outputs, samples)


def evaluate_selftest(model: LoadedModel, path: Path, atol: float, rtol: float) -> SelfTestReport:
    """Replay the vectors in ``path`` on ``model`` and measure every output; raises nothing on mismatch."""
    inputs, expected = read_vectors(path)
    produced = {spec.name for spec in model.outputs}
    unknown = sorted(set(expected[0]) - produced)
    if unknown:
        raise SelfTestError(
            f"self-test vectors name outputs {unknown} that the model does not produce ({sorted(produced)})"
        )
    report = SelfTestReport(samples=len(inputs))
    for index, (feeds, wanted) in enumerate(zip(inputs, expected, strict=True)):
        try:
            got = model.infer(feeds)
        except InferenceInputError as exc:
            raise SelfTestError(f"self-test sample {index} does not fit the model's inputs: {exc}") from exc
        for name, want in wanted.items():
            diff, mismatch = compare(index, name, got[name], want, atol, rtol)
            report.max_abs_diff[name] = max(report.max_abs_diff.get(name, 0.0), diff)
            if mismatch is not None:
                report.mismatches.append(mismatch)
    return report


def run_selftest(model: LoadedModel, path: Path, atol: float, rtol: float) -> SelfTestReport:
    """Replay the vectors; SelfTestError names the first sample and output outside the tolerance."""
    report = evaluate_selftest(model, path, atol, rtol)
    if not report.passed:
        first = report.mismatches[0]
        more = len(report.mismatches) - 1
        raise SelfTestError(
            f"self-test failed on this device: {first} (atol {atol:g}, rtol {rtol:g})"
            + (f"; {more} more sample/output pair(s) differ" if more else "")
        )
    log.info("self-test passed: %d sample(s), max |diff| %s", report.samples, report.max_abs_diff)
    return report


def compare(
    sample: int, name: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float
) -> tuple[float, Mismatch | None]:
    """The max absolute difference of ``got`` from ``want`` and, when outside tolerance, the mismatch."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        reason = f"shape {list(got.shape)} differs from the expected {list(want.shape)}"
        return float("inf"), Mismatch(sample, name, float("inf"), 0.0, reason)
    if got.size == 0:
        return 0.0, None
    if want.dtype.kind in "USO" or got.dtype.kind in "USO":
        bad = int(np.count_nonzero(got != want))
        if not bad:
            return 0.0, None
        return float("inf"), Mismatch(sample, name, float("inf"), 0.0, f"{bad} of {got.size} values differ")
    g, w = got.astype(np.float64), want.astype(np.float64)
    both_nan = np.isnan(g) & np.isnan(w)
    with np.errstate(invalid="ignore"):
        abs_diff = np.where(both_nan, 0.0, np.abs(g - w))
    abs_diff = np.where(np.isnan(abs_diff), np.inf, abs_diff)  # NaN against a number
    abs_diff = np.where(g == w, 0.0, abs_diff)  # equal infinities
    allowed = atol + rtol * np.abs(np.where(np.isfinite(w), w, 0.0))
    excess = abs_diff - allowed
    worst = int(np.argmax(excess))
    max_diff = float(abs_diff.max())
    if excess.flat[worst] <= 0:
        return max_diff, None
    return max_diff, Mismatch(sample, name, float(abs_diff.flat[worst]), float(allowed.flat[worst]))


def _stack(prefix: str, samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    names = list(samples[0])
    stacked: dict[str, np.ndarray] = {}
    for index, sample in enumerate(samples):
        if set(sample) != set(names):
            kind = prefix.rstrip(".") + "s"
            raise ValueError(f"sample {index} has {kind} {sorted(sample)}, sample 0 has {sorted(names)}")
    for name in names:
        values = [np.asarray(sample[name]) for sample in samples]
        if any(v.dtype.kind == "O" for v in values):
            raise ValueError(f"{prefix}{name} holds Python objects; store strings as a numpy str array")
        if len({(v.shape, v.dtype) for v in values}) != 1:
            raise ValueError(f"{prefix}{name}: every sample must have the same shape and dtype to be stacked")
        stacked[prefix + name] = np.stack(values)
    return stacked


def _load(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise SelfTestError(f"self-test vectors {path.name} hold a single array, not an .npz archive")
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SelfTestError(f"cannot read self-test vectors {path.name}: {exc}") from exc


def _split(arrays: Mapping[str, np.ndarray], samples: int) -> list[Sample]:
    return [{name: value[i] for name, value in arrays.items()} for i in range(samples)]
