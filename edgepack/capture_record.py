"""One captured sample as bytes: what the device's ring buffer stores, uploads, and the operator unpacks.

A record is an ``.npz`` (read with ``allow_pickle=False``) holding

* ``meta``: UTF-8 JSON as a uint8 array — ``model``, ``version``, ``at`` (RFC 3339), ``rule`` (which rule
  picked it: ``drift``, ``top_score`` or ``random``), ``drift`` (the level then), ``stats_only``, and for
  a stats-only record ``stats``: per tensor, per channel group ``mean``/``std``/``min``/``max``;
* ``input.<name>`` / ``output.<name>``: the values of the tensors the model's ``[capture]`` settings allow
  (none in a stats-only record).

Both sides import this module (numpy only). ``fleet/capture.py`` turns records into calibration files.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepack.errors import DataError
from edgepack.refstats import by_channel

META = "meta"


@dataclass
class CaptureRecord:
    meta: dict[str, Any]
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return str(self.meta.get("model", ""))

    def to_bytes(self) -> bytes:
        arrays = {META: np.frombuffer(json.dumps(self.meta, sort_keys=True).encode(), dtype=np.uint8)}
        arrays.update({f"input.{k}": np.asarray(v) for k, v in self.inputs.items()})
        arrays.update({f"output.{k}": np.asarray(v) for k, v in self.outputs.items()})
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CaptureRecord:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            meta = json.loads(arrays.pop(META).tobytes().decode("utf-8"))
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise DataError(f"a capture record is not readable: {exc}") from exc
        if not isinstance(meta, dict):
            raise DataError("a capture record's meta is not a JSON object")
        inputs = {k[6:]: v for k, v in arrays.items() if k.startswith("input.")}
        outputs = {k[7:]: v for k, v in arrays.items() if k.startswith("output.")}
        return cls(meta, inputs, outputs)


def channel_summary(array: np.ndarray, axis: int | None) -> dict[str, list[float]]:
    """Per channel ``mean``/``std``/``min``/``max`` of the finite values (a stats-only record's content)."""
    rows = by_channel(array, axis).astype(np.float64)
    finite = np.isfinite(rows)
    safe = np.where(finite, rows, np.nan)
    with warnings.catch_warnings():  # an all-NaN channel gives NaN (None), not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        out = {
            "mean": np.nanmean(safe, axis=1), "std": np.nanstd(safe, axis=1),
            "min": np.nanmin(safe, axis=1), "max": np.nanmax(safe, axis=1),
        }  # fmt: skip
    return {k: [None if np.isnan(x) else float(x) for x in v] for k, v in out.items()}  # type: ignore[misc]
