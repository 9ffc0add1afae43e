"""The contract between the local inference API and the agent's model repository.

The API never loads, swaps or unloads a model: it asks a :class:`ModelRepository` for a *lease* on a
:class:`ServedModel` for the length of one request. The repository (hot swap, rollback) lives elsewhere in
the agent; tests hand the API a fake that satisfies these protocols.

Lease semantics: ``acquire`` returns a context manager; the request runs on the model it acquired even if
a swap happens meanwhile, and the repository may free the old model only once every lease on it is
released. ``acquire`` raises :class:`~edgepack.errors.ModelNotFoundError` for an unknown name or version
and :class:`~edgepack.errors.ModelNotReadyError` when the model cannot serve now.

Threads: ``infer`` runs on the API's worker threads. ``ready``, ``index``, ``unready_models`` and the
``acquire`` made for model metadata run on the event loop, so they must be quick and never wait on I/O
or on a swap in progress (answer "not ready" instead).

Usage (what the API does per request)::

    with repository.acquire("resnet", version=None) as model:     # None: the active version
        outputs = model.infer({"input": x})
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import numpy as np

from edgepack.manifest import TensorSpec

__all__ = ["ModelRepository", "ServedModel"]


@runtime_checkable
class ServedModel(Protocol):
    """A loaded model the API may run.

    ``inputs``/``outputs`` are the manifest's signature: dtype names such as ``"float32"`` and shapes
    whose dims are ints (fixed) or strings (dynamic). ``infer`` is blocking and thread-safe; it receives
    C-contiguous arrays that may be read-only (they are views on the request body) and returns one array
    per output name. It raises :class:`~edgepack.errors.InferenceInputError` when inputs do not fit.
    """

    name: str
    version: str  # semantic version of the bundle, e.g. "1.2.0"
    platform: str  # e.g. "onnxruntime_onnx", "openvino_ir", "litert_tflite"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@runtime_checkable
class ModelRepository(Protocol):
    """The models the agent serves, as the API sees them."""

    def acquire(self, name: str, version: str | None = None) -> AbstractContextManager[ServedModel]:
        """A lease on model ``name`` (``version`` None: the active one); see the module docstring."""
        ...

    def ready(self, name: str, version: str | None = None) -> bool:
        """Whether the model can serve now; raises ModelNotFoundError for an unknown name/version.

        False while the model loads, and after its load failed, until a model that loaded (and passed its
        self-test) is in its place."""
        ...

    def index(self) -> list[dict[str, str]]:
        """One ``{"name", "version", "state", "reason"}`` per model version known (KServe index)."""
        ...

    def unready_models(self) -> dict[str, str]:
        """Every model the device should serve that cannot serve now, name → why (e.g. "loading", or why
        its load failed); empty when the server is ready. ``GET /v2/health/ready`` answers 200 only then."""
        ...
