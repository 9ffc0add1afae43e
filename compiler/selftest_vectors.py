"""Pipeline step 5: self-test vectors — real inputs and what the compiled model answers to them.

Inputs are the first samples of the validation data (the calibration data when no validation data is
given); outputs come from the compiled model run on this host by the target's runtime backend — the
shared ``edgepack.runtimes`` code the agent serves with. The tolerance depends on the precision, since
the device's kernels (TensorRT, another CPU's int8 paths) round differently from this host's: it is a
fraction of each bundle's own output scale, so it means the same for logits of 10 and of 1000.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.manifest import SelfTest
from edgepack.selftest import write_vectors

VECTORS_NAME = "selftest.npz"

# (atol as a fraction of the largest |output|, rtol) per precision the device runs.
_TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 2e-2), "int8": (5e-2, 5e-2)}


@dataclass(frozen=True)
class Vectors:
    path: Path
    selftest: SelfTest


def write_selftest(
    out_dir: Path,
    inputs: Sequence[Mapping[str, np.ndarray]],
    outputs: Sequence[Mapping[str, np.ndarray]],
    precision: str,
) -> Vectors:
    """Write the vectors into ``out_dir`` and return them with the manifest's SelfTest entry."""
    path = out_dir / VECTORS_NAME
    write_vectors(path, [dict(i) for i in inputs], [dict(o) for o in outputs])
    scale = max(
        (float(np.max(np.abs(v))) for o in outputs for v in o.values() if np.asarray(v).dtype.kind == "f" and v.size),
        default=1.0,
    )
    fraction, rtol = _TOLERANCE.get(precision, _TOLERANCE["int8"])
    atol = max(fraction * scale, 1e-5)
    return Vectors(path, SelfTest(vectors=VECTORS_NAME, atol=float(f"{atol:.6g}"), rtol=rtol, samples=len(inputs)))
