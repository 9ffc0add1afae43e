"""Sample data in: calibration, validation and self-test inputs through one small interface.

Like ``onnxruntime.quantization``'s ``CalibrationDataReader``, data is a tiny protocol so users bring it
any way they like. :func:`load_samples` accepts

* a single ``.npz`` whose arrays are keyed by input name, optionally with a ``labels`` array;
* a ``.npy`` file, for a model with exactly one input;
* a folder of such files (read in name order and concatenated);
* from Python, any iterable of dicts ``{input name: array, ["labels": array]}``, or a :class:`Samples`.

How an array is cut into samples, for a model input of rank r (its shape from the model's signature):

* rank r — stacked along the batch axis: ``[S, 3, 224, 224]`` for an input ``[1, 3, 224, 224]`` is S
  samples; for an input whose batch dimension is fixed at N > 1 the rows are taken N at a time;
* rank r + 1 — a sample axis in front of the full input shape: ``[S, 2, 1, 128]`` for an RNN state of
  shape ``[2, 1, 128]`` is S samples.

Every fixed dimension must match, the dtype must be the input's (float64 is accepted for a float32 input,
numpy's default, and cast). ``labels`` (optional) holds one label per row of the first input, in order.
When something does not fit, :class:`~edgepack.errors.DataError` says which input, what was expected and
what was found, and where it came from.

Usage::

    samples = load_samples("val.npz", model_inputs, what="validation data")
    for feed in samples.feeds:           # feed: {input name: array shaped like one inference's input}
        ...
    samples.labels                       # np.ndarray of len == rows, or None

Only numpy is needed here: the agent reads .npz inputs with the same rules (``edgepack run``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from edgepack.errors import DataError
from edgepack.manifest import TensorSpec

log = logging.getLogger(__name__)

LABELS_KEY = "labels"

# What callers may hand in. Strings and paths name files or folders.
SampleSource = Union[str, os.PathLike, "Samples", Iterable[Mapping[str, np.ndarray]]]


@dataclass(frozen=True)
class Samples:
    """Inputs ready to feed, one dict per inference, and optional labels (one per row)."""

    feeds: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    origin: str

    def __len__(self) -> int:
        return len(self.feeds)

    @property
    def rows(self) -> int:
        """How many rows (batch entries) the samples hold together; labels has one per row."""
        return sum(_rows_of(feed) for feed in self.feeds)

    def head(self, n: int) -> Samples:
        """The first ``n`` samples (and their labels)."""
        feeds = self.feeds[:n]
        labels = None
        if self.labels is not None:
            labels = self.labels[: sum(_rows_of(f) for f in feeds)]
        return Samples(feeds=feeds, labels=labels, origin=self.origin)

    def stacked(self, name: str) -> np.ndarray:
        """All samples of one input stacked on a new leading axis ([S] + per-inference shape)."""
        return np.stack([feed[name] for feed in self.feeds])


def load_samples(
    source: SampleSource,
    inputs: Sequence[TensorSpec],
    *,
    what: str = "data",
    limit: int | None = None,
) -> Samples:
    """Read ``source`` and cut it into per-inference feeds that fit ``inputs``.

    ``what`` names the data in error messages ("calibration data"); ``limit`` keeps the first samples.
    """
    if isinstance(source, Samples):
        samples = _check_feeds(source, inputs, what)
    elif isinstance(source, (str, os.PathLike)):
        samples = _from_path(Path(source), inputs, what)
    elif isinstance(source, Mapping):
        samples = _fit_arrays(source, inputs, what=what, origin="a dict of arrays")
    elif isinstance(source, Iterable):
        parts = [
            _fit_arrays(item, inputs, what=what, origin=f"item {i} of the iterable")
            for i, item in enumerate(_mappings(source, what))
        ]
        samples = _concat(parts, what, origin="an iterable of dicts")
    else:
        raise DataError(
            f"{what}: cannot read a {type(source).__name__}; give a .npz/.npy file, a folder of them, "
            "or an iterable of {input name: array} dicts"
        )
    if not samples.feeds:
        raise DataError(f"{what} from {samples.origin} holds no samples")
    if limit is not None and len(samples) > limit:
        samples = samples.head(limit)
    return samples


def describe_inputs(inputs: Sequence[TensorSpec]) -> str:
    """One line per input for messages: name, dtype and shape."""
    return ", ".join(f"{spec.name}: {spec.dtype} {_fmt_shape(spec.shape)}" for spec in inputs)


# --- reading -------------------------------------------------------------------------------------


def _from_path(path: Path, inputs: Sequence[TensorSpec], what: str) -> Samples:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
        if not files:
            raise DataError(f"{what}: folder {path} holds no .npz or .npy files")
        return _concat([_from_file(f, inputs, what) for f in files], what, origin=str(path))
    if not path.exists():
        raise DataError(f"{what}: {path} does not exist")
    return _from_file(path, inputs, what)


def _from_file(path: Path, inputs: Sequence[TensorSpec], what: str) -> Samples:
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if len(inputs) != 1:
                raise DataError(
                    f"{what}: {path} is a single .npy array but the model has {len(inputs)} inputs "
                    f"({describe_inputs(inputs)}); use an .npz keyed by input name"
                )
            return _fit_arrays({inputs[0].name: array}, inputs, what=what, origin=str(path))
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{what}: {path} is not a readable .npz/.npy file: {exc}") from exc
    return _fit_arrays(arrays, inputs, what=what, origin=str(path))


def _mappings(items: Iterable[object], what: str) -> Iterable[Mapping[str, np.ndarray]]:
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise DataError(f"{what}: item {i} is a {type(item).__name__}, not a dict of input name -> array")
        yield item


# --- fitting arrays to the model's inputs ---------------------------------------------------------


def _fit_arrays(arrays: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec], *, what: str, origin: str) -> Samples:
    names = [spec.name for spec in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        found = ", ".join(sorted(arrays)) or "nothing"
        raise DataError(
            f"{what} from {origin} lacks input(s) {', '.join(repr(m) for m in missing)}; "
            f"the model expects {describe_inputs(inputs)}; found {found}"
        )
    extra = [k for k in arrays if k not in names and k != LABELS_KEY]
    if extra:
        raise DataError(
            f"{what} from {origin} holds array(s) {', '.join(repr(e) for e in extra)} that are not model "
            f"inputs; the model's inputs are {describe_inputs(inputs)} (plus an optional 'labels')"
        )
    per_input = {spec.name: _split(np.asarray(arrays[spec.name]), spec, what, origin) for spec in inputs}
    counts = {name: len(parts) for name, parts in per_input.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise DataError(f"{what} from {origin}: inputs hold different numbers of samples ({detail})")
    n = next(iter(counts.values()))
    feeds = [{name: parts[i] for name, parts in per_input.items()} for i in range(n)]
    labels = _labels(arrays.get(LABELS_KEY), feeds, what, origin)
    return Samples(feeds=feeds, labels=labels, origin=origin)


def _split(array: np.ndarray, spec: TensorSpec, what: str, origin: str) -> list[np.ndarray]:
    """Cut one input's array into per-inference arrays, or say exactly why it does not fit."""
    array = _dtype_fit(array, spec, what, origin)
    rank = len(spec.shape)
    if array.ndim == rank + 1:
        parts = list(array)
    elif array.ndim == rank and rank > 0:
        batch = spec.shape[0]
        step = batch if isinstance(batch, int) and batch > 0 else 1
        if array.shape[0] % step:
            raise DataError(
                f"{what} from {origin}, input {spec.name!r}: {array.shape[0]} rows do not divide into "
                f"samples of the fixed batch size {step} (model input shape {_fmt_shape(spec.shape)})"
            )
        parts = [array[i : i + step] for i in range(0, array.shape[0], step)]
    else:
        raise DataError(_shape_message(array, spec, what, origin))
    for part in parts:
        if not _shape_fits(part.shape, spec.shape):
            raise DataError(_shape_message(array, spec, what, origin))
    return [np.ascontiguousarray(p) for p in parts]


def _dtype_fit(array: np.ndarray, spec: TensorSpec, what: str, origin: str) -> np.ndarray:
    if array.dtype.name == spec.dtype:
        return array
    if array.dtype == np.float64 and spec.dtype == "float32":
        return array.astype(np.float32)
    raise DataError(
        f"{what} from {origin}, input {spec.name!r}: expected dtype {spec.dtype}, found {array.dtype.name} "
        f"(shape {list(array.shape)}); convert it, e.g. array.astype(np.{spec.dtype})"
    )


def _shape_fits(shape: tuple[int, ...], dims: Sequence[int | str]) -> bool:
    if len(shape) != len(dims):
        return False
    return all(not isinstance(d, int) or d == s for s, d in zip(shape, dims, strict=True))


def _shape_message(array: np.ndarray, spec: TensorSpec, what: str, origin: str) -> str:
    dims = _fmt_shape(spec.shape)
    if spec.shape:
        rest = _fmt_shape(spec.shape[1:], open_end=True)
        forms = f"[S, {dims[1:-1]}] (one more axis in front) or [rows{rest}] (stacked on the batch axis)"
    else:
        forms = "[S] (one scalar per sample)"
    return (
        f"{what} from {origin}, input {spec.name!r}: the model expects {spec.dtype} {dims}, given as {forms}; "
        f"found {array.dtype.name} {list(array.shape)}"
    )


def _labels(raw: np.ndarray | None, feeds: list[dict[str, np.ndarray]], what: str, origin: str) -> np.ndarray | None:
    if raw is None:
        return None
    labels = np.asarray(raw)
    if labels.ndim == 0:
        labels = labels.reshape(1)
    rows = sum(_rows_of(f) for f in feeds)
    if labels.shape[0] != rows:
        raise DataError(
            f"{what} from {origin}: 'labels' has {labels.shape[0]} entries but the inputs hold {rows} rows "
            f"({len(feeds)} samples); give one label per row"
        )
    return labels


def _rows_of(feed: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feed.values()))
    return int(first.shape[0]) if first.ndim > 0 else 1


def _check_feeds(samples: Samples, inputs: Sequence[TensorSpec], what: str) -> Samples:
    for i, feed in enumerate(samples.feeds):
        for spec in inputs:
            if spec.name not in feed:
                raise DataError(f"{what}: sample {i} lacks input {spec.name!r}")
            array = feed[spec.name]
            if array.dtype.name != spec.dtype or not _shape_fits(array.shape, spec.shape):
                raise DataError(_shape_message(array, spec, what, f"{samples.origin}, sample {i}"))
    return samples


def _concat(parts: list[Samples], what: str, origin: str) -> Samples:
    with_labels = [p.labels is not None for p in parts]
    if any(with_labels) and not all(with_labels):
        lacking = [p.origin for p in parts if p.labels is None]
        raise DataError(f"{what} from {origin}: some parts have 'labels' and some do not ({', '.join(lacking)})")
    feeds = [feed for p in parts for feed in p.feeds]
    labels = np.concatenate([p.labels for p in parts]) if parts and all(with_labels) else None  # type: ignore[misc]
    return Samples(feeds=feeds, labels=labels, origin=origin)


def _fmt_shape(shape: Sequence[int | str], open_end: bool = False) -> str:
    inner = ", ".join(str(d) for d in shape)
    if open_end:
        return (", " + inner) if inner else ""
    return f"[{inner}]"
