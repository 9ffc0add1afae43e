"""Run models on this host: through the shared runtime backend, or a raw onnxruntime session.

What the compiler *reports* (accuracy of the compiled model, self-test outputs, speed) is computed with
``edgepack.runtimes``' onnxruntime backend — the very code the agent serves with — kept on the CPU so
results are reproducible on any build host. Internals that need onnxruntime features the backend does not
expose (calibration, per-tensor dumps) open raw sessions with :func:`raw_session`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import RuntimeBackendError, UnsupportedModelError
from edgepack.manifest import TensorSpec
from edgepack.runtimes.base import LoadedModel, RuntimeOptions, get_backend

log = logging.getLogger(__name__)

CPU_PLAN: dict[str, Any] = {"providers": [{"name": "CPUExecutionProvider", "options": {}}]}

Feeds = Sequence[Mapping[str, np.ndarray]]


def load_on_host(
    model_path: Path,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    *,
    threads: int | None = None,
    what: str = "model",
    execution: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load ``model_path`` with the onnxruntime backend on this host's CPU (``execution``: the host plan)."""
    backend = get_backend("onnxruntime")
    try:
        return backend.load(
            model_path,
            inputs=inputs,
            outputs=outputs,
            execution=execution if execution is not None else CPU_PLAN,
            options=RuntimeOptions(threads=threads, allow_accelerators=False),
        )
    except RuntimeBackendError as exc:
        raise UnsupportedModelError(f"onnxruntime cannot load the {what}: {exc}") from exc


def run_on_host(
    model_path: Path,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    feeds: Feeds,
    *,
    what: str = "model",
    on_sample: Callable[[], None] | None = None,
    execution: Mapping[str, Any] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Outputs of ``model_path`` for every feed, computed with the runtime backend on this host."""
    model = load_on_host(model_path, inputs, outputs, what=what, execution=execution)
    try:
        results = []
        for feed in feeds:
            try:
                results.append(model.infer(feed))
            except RuntimeBackendError as exc:
                raise UnsupportedModelError(f"onnxruntime cannot run the {what}: {exc}") from exc
            if on_sample is not None:
                on_sample()
        return results
    finally:
        model.close()


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
