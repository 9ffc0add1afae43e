"""The onnxruntime backend: runs ``.onnx`` models with the execution providers the bundle's plan names.

The bundle's ``execution`` plan lists providers in order of preference::

    {"providers": [{"name": "TensorrtExecutionProvider", "options": {"trt_engine_cache_path": "trt"}},
                   {"name": "CUDAExecutionProvider", "options": {}},
                   {"name": "CPUExecutionProvider", "options": {}}],
     "graph_optimization_level": "all"}

Providers this onnxruntime build lacks are dropped (and logged); the CPU provider always comes last, and
is the only one when the device disallows accelerators. Provider options that name cache files are
resolved under the device's ``cache_dir`` and may not point outside it. Sessions are thread-safe, so one
session serves every caller.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgepack.errors import RuntimeBackendError
from edgepack.manifest import TensorSpec
from edgepack.runtimes.base import LoadedModel, RuntimeBackend, RuntimeOptions
from edgepack.runtimes.tensors import SignatureAdapter, reconcile_specs

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"

# Provider options that name a file or folder; relative values are resolved under RuntimeOptions.cache_dir.
PATH_OPTIONS: dict[str, tuple[str, ...]] = {
    "TensorrtExecutionProvider": ("trt_engine_cache_path", "trt_timing_cache_path", "trt_ep_context_file_path"),
    "OpenVINOExecutionProvider": ("cache_dir",),
}

# ONNX element types ("tensor(float)") to manifest dtype names.
_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
    **{f"tensor({t})": t for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")},
}

_OPTIMIZATION_LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}

Provider = tuple[str, dict[str, str]]


class OnnxRuntimeBackend(RuntimeBackend):
    """Loads ``.onnx`` files into onnxruntime inference sessions."""

    name = "onnxruntime"
    extra = "agent-onnx"
    module = "onnxruntime"

    def load(
        self,
        model_path: Path,
        *,
        inputs: Sequence[TensorSpec] = (),
        outputs: Sequence[TensorSpec] = (),
        execution: Mapping[str, Any] | None = None,
        options: RuntimeOptions | None = None,
    ) -> LoadedModel:
        import onnxruntime as ort

        model_path = Path(model_path)
        execution, options = execution or {}, options or RuntimeOptions()
        available = ort.get_available_providers()
        providers = select_providers(execution.get("providers"), available, options)
        session_options = _session_options(ort, execution, options)
        try:
            session = ort.InferenceSession(
                str(model_path),
                sess_options=session_options,
                providers=[name for name, _ in providers],
                provider_options=[opts for _, opts in providers],
            )
        except _ort_errors() as exc:
            raise RuntimeBackendError(f"onnxruntime cannot load {model_path.name}: {exc}") from exc
        native_in = [_spec(arg, model_path) for arg in session.get_inputs()]
        native_out = [_spec(arg, model_path) for arg in session.get_outputs()]
        return OnnxRuntimeModel(
            session,
            reconcile_specs("input", inputs, native_in, model_path),
            reconcile_specs("output", outputs, native_out, model_path),
            threads=options.threads,
        )


class OnnxRuntimeModel(LoadedModel):
    """One onnxruntime session; ``infer`` may be called from many threads at once."""

    def __init__(
        self, session: Any, inputs: list[TensorSpec], outputs: list[TensorSpec], *, threads: int | None
    ) -> None:
        self._session: Any = session
        self.inputs = inputs
        self.outputs = outputs
        self._adapter = SignatureAdapter(inputs, outputs)
        self._output_names = [spec.name for spec in outputs]
        self._threads = threads

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self._adapter.to_native(inputs)
        session = self._live_session()
        try:
            results = session.run(self._output_names, feeds)
        except _ort_errors() as exc:
            raise RuntimeBackendError(f"onnxruntime failed to run the model: {exc}") from exc
        return self._adapter.from_native(dict(zip(self._output_names, results, strict=True)))

    def close(self) -> None:
        self._session = None

    def describe(self) -> dict[str, Any]:
        session = self._session
        if session is None:
            return {"runtime": "onnxruntime", "closed": True}
        return {
            "runtime": "onnxruntime",
            "providers": list(session.get_providers()),
            "threads": self._threads,
        }

    def _live_session(self) -> Any:
        session = self._session
        if session is None:
            raise RuntimeBackendError("this model has been closed; load it again to run it")
        return session


def select_providers(
    planned: Sequence[Mapping[str, Any] | str] | None,
    available: Sequence[str],
    options: RuntimeOptions,
) -> list[Provider]:
    """The providers to use, in order: the plan's that ``available`` has, then the CPU provider.

    Entries of ``planned`` are ``{"name": ..., "options": {...}}`` or bare provider names.
    """
    chosen: list[Provider] = []
    cpu_options: dict[str, str] = {}
    dropped: list[str] = []
    for entry in planned or ():
        name, provider_options = _parse_provider(entry)
        if name == CPU_PROVIDER:
            cpu_options = _stringify(provider_options)
        elif not options.allow_accelerators or name not in available:
            dropped.append(name)
        else:
            chosen.append((name, _resolve_paths(name, provider_options, options.cache_dir)))
    if dropped:
        if options.allow_accelerators:
            reason = f"this onnxruntime build has only {list(available)}"
        else:
            reason = "accelerators are disallowed on this device"
        log.info("onnxruntime: not using %s: %s", ", ".join(dropped), reason)
    return [*chosen, (CPU_PROVIDER, cpu_options)]


def _parse_provider(entry: Mapping[str, Any] | str) -> tuple[str, Mapping[str, Any]]:
    if isinstance(entry, str):
        return entry, {}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise RuntimeBackendError(
            f"execution provider entry {entry!r} must be a provider name or {{'name': ..., 'options': {{...}}}}"
        )
    provider_options = entry.get("options") or {}
    if not isinstance(provider_options, Mapping):
        raise RuntimeBackendError(f"options of provider {entry['name']!r} must be a mapping")
    return entry["name"], provider_options


def _resolve_paths(provider: str, provider_options: Mapping[str, Any], cache_dir: Path | None) -> dict[str, str]:
    """``provider_options`` as strings, with cache paths placed under ``cache_dir``."""
    resolved = _stringify(provider_options)
    for key in PATH_OPTIONS.get(provider, ()):
        if key in resolved:
            resolved[key] = _cache_path(provider, key, resolved[key], cache_dir)
    return resolved


def _cache_path(provider: str, key: str, value: str, cache_dir: Path | None) -> str:
    value = fill_device_placeholders(value)
    relative = PurePosixPath(value)
    if relative.is_absolute() or ".." in relative.parts:
        raise RuntimeBackendError(
            f"{provider} option {key}={value!r} must be a relative path inside the device's cache "
            "directory; the bundle's execution plan may not name other places"
        )
    if cache_dir is None:
        log.debug("onnxruntime: no cache_dir set; %s=%s stays relative to the working directory", key, value)
        return value
    path = Path(cache_dir) / relative
    (path.parent if key.endswith("_file_path") else path).mkdir(parents=True, exist_ok=True)
    return str(path)


def fill_device_placeholders(value: str) -> str:
    """Replace ``{trt_version}`` and ``{gpu}`` in a cache path with this device's TensorRT version and GPU.

    The compiler keys TensorRT engine and timing caches by model hash + TensorRT version + GPU, so the first
    boot builds the engine once and later boots (or the same model on an identical device) reuse it, while
    a TensorRT upgrade or another GPU never loads a stale engine.
    """
    if "{trt_version}" in value:
        value = value.replace("{trt_version}", _safe_component(_tensorrt_version()))
    if "{gpu}" in value:
        value = value.replace("{gpu}", _safe_component(_gpu_name()))
    return value


@functools.cache
def _tensorrt_version() -> str:
    for dist in ("tensorrt", "tensorrt-libs", "tensorrt_libs", "tensorrt-cu12", "tensorrt-cu13"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "trt-unknown"


@functools.cache
def _gpu_name() -> str:
    """The GPU's name: nvidia-smi on dGPU machines, the device-tree model on Jetson boards."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    model = Path("/proc/device-tree/model")
    if model.is_file():
        return model.read_text(errors="replace").strip("\x00 \n")
    return "gpu-unknown"


def _safe_component(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "unknown"


def _stringify(provider_options: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): _option_text(v) for k, v in provider_options.items()}


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _session_options(ort: Any, execution: Mapping[str, Any], options: RuntimeOptions) -> Any:
    session_options = ort.SessionOptions()
    if options.threads is not None:
        session_options.intra_op_num_threads = options.threads
        session_options.inter_op_num_threads = options.inter_threads or 1
    elif options.inter_threads is not None:
        session_options.inter_op_num_threads = options.inter_threads
    if options.spinning is not None:  # idle pool threads busy-wait by default: a cost when models share cores
        flag = "1" if options.spinning else "0"
        session_options.add_session_config_entry("session.intra_op.allow_spinning", flag)
        session_options.add_session_config_entry("session.inter_op.allow_spinning", flag)
    level = execution.get("graph_optimization_level")
    if level is not None:
        session_options.graph_optimization_level = _optimization_level(ort, level)
    return session_options


def _optimization_level(ort: Any, level: Any) -> Any:
    members = ort.GraphOptimizationLevel.__members__
    name = _OPTIMIZATION_LEVELS.get(str(level).lower(), str(level))
    if name not in members:
        raise RuntimeBackendError(
            f"graph_optimization_level {level!r} is not one of {sorted(_OPTIMIZATION_LEVELS)} or {sorted(members)}"
        )
    return members[name]


def _spec(arg: Any, model_path: Path) -> TensorSpec:
    """A TensorSpec for an onnxruntime NodeArg."""
    dtype = _ONNX_DTYPES.get(arg.type)
    if dtype is None:
        raise RuntimeBackendError(
            f"{model_path.name}: tensor {arg.name!r} has element type {arg.type}, which edgepack cannot serve"
        )
    shape = [d if isinstance(d, int) else (d or "?") for d in (arg.shape or [])]
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape)


def _ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types onnxruntime raises for models it cannot load or run."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel",
             "NotImplemented", "RuntimeException", "EPFail", "EngineError", "NotFound")  # fmt: skip
    found = tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))
    return (*found, RuntimeError, ValueError)
