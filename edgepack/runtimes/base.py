"""The one small interface every runtime backend implements.

A backend turns a model file (plus the bundle's execution plan) into a :class:`LoadedModel` that
describes its inputs and outputs and runs inference on a dict of named numpy arrays. Backends know
nothing of HTTP, MQTT or bundles on disk beyond the model file they are handed; the compiler uses them to
validate models and compute self-test outputs, the agent to serve.

Usage::

    backend = get_backend("onnxruntime")          # RuntimeNotInstalledError names the extra to install
    model = backend.load(path, inputs=manifest.inputs, outputs=manifest.outputs,
                         execution=manifest.execution, options=RuntimeOptions(threads=2))
    outputs = model.infer({"input": x})
    model.close()
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgepack.errors import RuntimeNotInstalledError
from edgepack.manifest import TensorSpec


@dataclass(frozen=True)
class RuntimeOptions:
    """Device-side settings that are not the bundle's to decide.

    ``threads``: intra-op threads (None: the runtime's default). ``allow_accelerators``: False keeps a
    model on the CPU even where the bundle's plan asks for a GPU/NPU. ``cache_dir``: where a runtime may
    keep compiled engines/caches between boots (TensorRT engines, OpenVINO model cache).
    ``inter_threads``: inter-op threads (None: the runtime's default). ``spinning``: False stops idle
    runtime threads from busy-waiting (and OpenVINO from pinning cores), for models that share few cores
    (:mod:`~edgepack.runtimes.threads`); None: the runtime's default.
    """

    threads: int | None = None
    inter_threads: int | None = None
    spinning: bool | None = None
    allow_accelerators: bool = True
    cache_dir: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class LoadedModel(ABC):
    """A model ready to run. ``infer`` is thread-safe; ``close`` frees the runtime's resources."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abstractmethod
    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference. Keys of the result are the output names, in ``self.outputs`` order."""

    @abstractmethod
    def close(self) -> None:
        """Release the session; the model is not used afterwards."""

    def describe(self) -> dict[str, Any]:
        """Runtime details worth reporting (providers in use, precision hint, ...)."""
        return {}


class RuntimeBackend(ABC):
    """Loads model files of one runtime."""

    name: ClassVar[str]
    extra: ClassVar[str]  # the pip extra that installs this runtime on a device
    module: ClassVar[str]  # the import name of the runtime itself

    @classmethod
    def installed_version(cls) -> str | None:
        """The installed runtime's version, or None when it is not installed."""
        try:
            mod = importlib.import_module(cls.module)
        except ImportError:
            return None
        return str(getattr(mod, "__version__", "0"))

    @abstractmethod
    def load(
        self,
        model_path: Path,
        *,
        inputs: Sequence[TensorSpec] = (),
        outputs: Sequence[TensorSpec] = (),
        execution: Mapping[str, Any] | None = None,
        options: RuntimeOptions | None = None,
    ) -> LoadedModel:
        """Load ``model_path``; ``execution`` is the bundle's runtime plan (providers, precision, ...).

        ``inputs``/``outputs`` are the bundle's signature (names, dtypes, shapes, layouts); when empty
        (describing a bare model file, e.g. for ``edgepack bundle create``) they are read from the
        model itself and ``LoadedModel.inputs``/``outputs`` report what the model declares.
        """


_BACKENDS: dict[str, tuple[str, str]] = {
    # runtime name -> (module:class, extra)
    "onnxruntime": ("edgepack.runtimes.onnxruntime_backend:OnnxRuntimeBackend", "agent-onnx"),
    "openvino": ("edgepack.runtimes.openvino_backend:OpenVinoBackend", "agent-openvino"),
    "litert": ("edgepack.runtimes.litert_backend:LiteRtBackend", "agent-litert"),
}


def known_runtimes() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str) -> RuntimeBackend:
    """The backend for runtime ``name``; RuntimeNotInstalledError names the extra when it is missing."""
    if name not in _BACKENDS:
        raise RuntimeNotInstalledError(f"unknown runtime {name!r}; edgepack knows {', '.join(_BACKENDS)}")
    target, extra = _BACKENDS[name]
    module_name, class_name = target.split(":")
    backend_cls: type[RuntimeBackend] = getattr(importlib.import_module(module_name), class_name)
    if backend_cls.installed_version() is None:
        raise RuntimeNotInstalledError(
            f"this bundle needs the {name} runtime, which is not installed; "
            f"install it with: pip install 'edgepack[{extra}]'"
        )
    return backend_cls()
