"""The OpenVINO backend: runs OpenVINO IR (``.xml`` with its ``.bin``), ``.onnx`` and ``.tflite`` models.

The bundle's ``execution`` plan may name::

    {"device": "GPU", "inference_precision": "f16"}

``device`` defaults to "CPU" and falls back to it when the device is missing or the device disallows
accelerators. ``inference_precision`` (default "f32") is always pinned through
``INFERENCE_PRECISION_HINT``: left alone, OpenVINO silently computes in bf16 on CPUs that have it, and the
self-test outputs the compiler measured would no longer reproduce. ``describe()`` reports the precision
the compiled model actually uses, read back from it.

A ``CompiledModel`` is thread-safe but an ``InferRequest`` is not: each call borrows a request from a
small pool, so concurrent callers never share one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from edgepack.errors import RuntimeBackendError
from edgepack.manifest import TensorSpec
from edgepack.runtimes.base import LoadedModel, RuntimeBackend, RuntimeOptions
from edgepack.runtimes.tensors import SignatureAdapter, reconcile_specs

log = logging.getLogger(__name__)

DEFAULT_DEVICE = "CPU"
DEFAULT_PRECISION = "f32"
MODEL_SUFFIXES = (".xml", ".onnx", ".tflite")
_VIRTUAL_DEVICES = frozenset({"AUTO", "MULTI", "HETERO", "BATCH"})
_MAX_REQUESTS = 8

# OpenVINO element type names to manifest dtype names.
_OV_DTYPES = {
    "f32": "float32", "f64": "float64", "f16": "float16", "bf16": "bfloat16", "boolean": "bool",
    "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64",
    "u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64", "string": "string",
}  # fmt: skip

T = TypeVar("T")


class OpenVinoBackend(RuntimeBackend):
    """Compiles models with OpenVINO for the device the plan names."""

    name = "openvino"
    extra = "agent-openvino"
    module = "openvino"

    @classmethod
    def installed_version(cls) -> str | None:
        """The release, e.g. "2026.4.1": ``openvino.__version__`` carries a build suffix
        ("2026.4.1-22982-e213a147257-releases/2026/4") that is not a PEP 440 version, so a bundle's
        runtime range (">=2024.4") would never admit it."""
        version = super().installed_version()
        return version.split("-", 1)[0] if version is not None else None

    def load(
        self,
        model_path: Path,
        *,
        inputs: Sequence[TensorSpec] = (),
        outputs: Sequence[TensorSpec] = (),
        execution: Mapping[str, Any] | None = None,
        options: RuntimeOptions | None = None,
    ) -> LoadedModel:
        import openvino as ov

        model_path = Path(model_path)
        execution, options = execution or {}, options or RuntimeOptions()
        core = ov.Core()
        model = _read_model(core, model_path)
        device = choose_device(str(execution.get("device") or DEFAULT_DEVICE), core.available_devices, options)
        config = compile_config(execution, options)
        try:
            compiled = core.compile_model(model, device, config)
        except RuntimeError as exc:
            raise RuntimeBackendError(
                f"OpenVINO cannot compile {model_path.name} for {device} with {config}: {exc}"
            ) from exc
        wanted = {spec.name for spec in [*inputs, *outputs]}
        _check_precision(compiled, config["INFERENCE_PRECISION_HINT"], device)
        native_in = [_spec(port, model_path, wanted) for port in compiled.inputs]
        native_out = [_spec(port, model_path, wanted) for port in compiled.outputs]
        return OpenVinoModel(
            compiled,
            reconcile_specs("input", inputs, native_in, model_path),
            reconcile_specs("output", outputs, native_out, model_path),
            device=device,
        )


class OpenVinoModel(LoadedModel):
    """A compiled OpenVINO model; each ``infer`` runs on an infer request no other call is using."""

    def __init__(self, compiled: Any, inputs: list[TensorSpec], outputs: list[TensorSpec], *, device: str) -> None:
        self._compiled: Any = compiled
        self.inputs = inputs
        self.outputs = outputs
        self._device = device
        self._adapter = SignatureAdapter(inputs, outputs)
        self._ports = {_port_name(port, set()): port for port in compiled.outputs}
        self._ports.update({name: port for port in compiled.outputs for name in port.get_names()})
        self._requests: Pool[Any] = Pool(compiled.create_infer_request, _request_limit(compiled))

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self._adapter.to_native(inputs)
        if self._compiled is None:
            raise RuntimeBackendError("this model has been closed; load it again to run it")
        with self._requests.borrow() as request:
            try:
                results = request.infer(feeds, share_inputs=False, share_outputs=False)
            except RuntimeError as exc:
                raise RuntimeBackendError(f"OpenVINO failed to run the model: {exc}") from exc
            native = {spec.name: np.asarray(results[self._ports[spec.name]]) for spec in self.outputs}
        return self._adapter.from_native(native)

    def close(self) -> None:
        self._requests.clear()
        self._compiled = None

    def describe(self) -> dict[str, Any]:
        compiled = self._compiled
        if compiled is None:
            return {"runtime": "openvino", "closed": True}
        return {
            "runtime": "openvino",
            "device": self._device,
            "execution_devices": _property(compiled, "EXECUTION_DEVICES"),
            "inference_precision": _type_name(_property(compiled, "INFERENCE_PRECISION_HINT")),
            "threads": _property(compiled, "INFERENCE_NUM_THREADS"),
        }


class Pool(Generic[T]):
    """At most ``limit`` objects made by ``factory`` on demand, each lent to one borrower at a time."""

    def __init__(self, factory: Callable[[], T], limit: int) -> None:
        self._factory = factory
        self._limit = max(1, limit)
        self._idle: list[T] = []
        self._made = 0
        self._cond = threading.Condition()

    @contextmanager
    def borrow(self) -> Iterator[T]:
        item = self._take()
        try:
            yield item
        finally:
            with self._cond:
                self._idle.append(item)
                self._cond.notify()

    def clear(self) -> None:
        """Drop the idle objects so their memory can be freed."""
        with self._cond:
            self._idle.clear()

    def _take(self) -> T:
        with self._cond:
            while not self._idle and self._made >= self._limit:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._made += 1
        try:
            return self._factory()
        except BaseException:
            with self._cond:
                self._made -= 1
                self._cond.notify()
            raise


def choose_device(planned: str, available: list[str], options: RuntimeOptions) -> str:
    """The device to compile for: ``planned`` when usable here, else the CPU."""
    if not options.allow_accelerators and planned != DEFAULT_DEVICE:
        log.info("OpenVINO: accelerators are disallowed on this device; using CPU instead of %s", planned)
        return DEFAULT_DEVICE
    base = planned.split(":", 1)[0].split(".", 1)[0]
    if base in _VIRTUAL_DEVICES or planned in available or any(d.split(".")[0] == planned for d in available):
        return planned
    log.info("OpenVINO: device %s is not available (have %s); using CPU", planned, available)
    return DEFAULT_DEVICE


def compile_config(execution: Mapping[str, Any], options: RuntimeOptions) -> dict[str, Any]:
    """The properties passed to ``compile_model``: pinned precision, threads, cache folder."""
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": str(execution.get("inference_precision") or DEFAULT_PRECISION)
    }
    if options.threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(options.threads)
    if options.spinning is False:  # models sharing few cores: no core pinning, one stream each
        config["ENABLE_CPU_PINNING"] = False
        config["NUM_STREAMS"] = 1
    if options.cache_dir is not None:
        cache = Path(options.cache_dir) / "openvino"
        cache.mkdir(parents=True, exist_ok=True)
        config["CACHE_DIR"] = str(cache)
    return config


def _check_precision(compiled: Any, requested: str, device: str) -> None:
    actual = _type_name(_property(compiled, "INFERENCE_PRECISION_HINT"))
    if actual is not None and actual != requested:
        log.warning(
            "OpenVINO: %s runs this model in %s, not the %s the bundle asks for (the device lacks it)",
            device,
            actual,
            requested,
        )


def _read_model(core: Any, model_path: Path) -> Any:
    suffix = model_path.suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise RuntimeBackendError(f"OpenVINO loads {', '.join(MODEL_SUFFIXES)} files, not {model_path.name}")
    if not model_path.is_file():
        raise RuntimeBackendError(f"model file {model_path} does not exist")
    if suffix == ".xml" and not model_path.with_suffix(".bin").is_file():
        raise RuntimeBackendError(
            f"OpenVINO IR {model_path.name} needs its weights {model_path.with_suffix('.bin').name} "
            "beside it, and they are missing"
        )
    try:
        return core.read_model(str(model_path))
    except RuntimeError as exc:
        raise RuntimeBackendError(f"OpenVINO cannot read {model_path.name}: {exc}") from exc


def _request_limit(compiled: Any) -> int:
    """How many infer requests to keep: OpenVINO's optimum (1 under the default latency hint), at least 2
    so that one caller's copies overlap another's inference, at most ``_MAX_REQUESTS``."""
    optimal = _property(compiled, "OPTIMAL_NUMBER_OF_INFER_REQUESTS")
    return min(_MAX_REQUESTS, max(2, optimal if isinstance(optimal, int) else 0))


def _property(compiled: Any, key: str) -> Any:
    try:
        return compiled.get_property(key)
    except RuntimeError:  # a property this device does not report
        return None


def _type_name(value: Any) -> str | None:
    if value is None:
        return None
    get_name = getattr(value, "get_type_name", None)
    return str(get_name()) if callable(get_name) else str(value)


def _port_name(port: Any, wanted: set[str]) -> str:
    """The port's name: the one of its tensor names the manifest uses, else any of them."""
    names = set(port.get_names())
    if names & wanted:
        return sorted(names & wanted)[0]
    return port.get_any_name() if names else f"tensor_{port.get_index()}"


def _spec(port: Any, model_path: Path, wanted: set[str]) -> TensorSpec:
    """A TensorSpec for a compiled model's input or output port."""
    name = _port_name(port, wanted)
    element = port.get_element_type().get_type_name()
    dtype = _OV_DTYPES.get(element)
    if dtype is None:
        raise RuntimeBackendError(
            f"{model_path.name}: tensor {name!r} has element type {element}, which edgepack cannot serve"
        )
    shape = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
    return TensorSpec(name=name, dtype=dtype, shape=shape)
