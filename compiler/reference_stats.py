"""The compile step that writes a bundle's reference statistics (``refstats.json``) for the device.

Inputs are summarised from the calibration data (what the model was quantized on), outputs from the
original model's outputs on the evaluation data (the compiler has them already, to judge accuracy). The
format and the summary itself live in :mod:`edgepack.refstats`, which the device imports too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgepack.datasets import Samples
from edgepack.manifest import TensorSpec
from edgepack.refstats import FILE_NAME, ReferenceStats, summarize_all


def write_reference_stats(
    directory: Path,
    calibration: Samples,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    reference_outputs: Sequence[dict[str, np.ndarray]],
) -> tuple[Path, ReferenceStats]:
    """Summarise the data and write ``refstats.json`` in ``directory``; returns its path and the stats."""
    stats = ReferenceStats(
        inputs=summarize_all(inputs, calibration.feeds, "input"),
        outputs=summarize_all(outputs, reference_outputs, "output"),
        source=f"inputs: calibration data ({calibration.origin}, {len(calibration)} samples); "
        "outputs: the original model on the evaluation data",
    )
    path = Path(directory) / FILE_NAME
    path.write_bytes(stats.to_bytes())
    return path, stats
