"""Raw onnxruntime sessions for the compiler's internals, and the CPU plan used on the build host.

What the compiler *reports* (accuracy of the compiled model, self-test outputs, speed) is computed with the
target's runtime backend through :func:`edgepack.compiler.family.run_host_model` — the very code the agent
serves with — kept on the CPU so results are reproducible on any build host. Internals that need
onnxruntime features the backend does not expose (calibration, per-tensor dumps, timing) open raw sessions
with :func:`raw_session`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CPU_PLAN: dict[str, Any] = {"providers": [{"name": "CPUExecutionProvider", "options": {}}]}

Feeds = Sequence[Mapping[str, np.ndarray]]


def raw_session(model: Path | bytes, *, threads: int | None = None) -> Any:
    """A plain onnxruntime CPU InferenceSession (for internals: dumps, timing)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
