"""The live models a device serves, and hot swap with no failed request.

Each model name has a :class:`ModelSlot` holding the current :class:`LiveModel` (a loaded runtime model
plus its bundle's name, version and signature). A request *leases* the slot's current model and runs on
it to the end even if a swap happens meanwhile; ``swap`` points new leases at the new model at once and
closes the old one when its last lease is returned. Nothing waits on the event loop: a lease is a counter
under a lock.

:class:`LiveModels` is the collection of slots and implements the local API's ``ModelRepository``
protocol (``acquire``, ``ready``, ``index``, ``unready_models``).

Readiness is strict (what users ask Triton and MLServer for): the server is ready only when every model
the device *should* serve has a model in its slot. Which models those are comes from ``expected`` (for the
agent, :class:`ActiveModels`: every name with an active bundle in the store's ``state.json``) plus the
names given to :meth:`LiveModels.require` (``edgepack serve``'s bundle). A model enters a slot only after
it loaded and passed its self-test (the installer's stage step; at boot too), so "in the slot" means "loaded
and self-tested". A name that should serve and has no model (still loading, or its load failed) is not
ready, with the reason, until a model that loaded is put in its slot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepack.agent.store import STATE_FILE, DeviceStore
from edgepack.errors import EdgepackError, ModelNotFoundError, ModelNotReadyError
from edgepack.manifest import Manifest, TensorSpec
from edgepack.runtimes.base import LoadedModel

log = logging.getLogger(__name__)

PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino_ir", "litert": "litert_tflite"}


@dataclass
class LiveModel:
    """A loaded bundle as the API serves it (the API's ``ServedModel``)."""

    manifest: Manifest
    digest: str
    runtime_model: LoadedModel
    leases: int = 0
    retired: bool = False
    closed: bool = False
    # field data (agent/field_data.py): sees each answered request; never raises, never waits
    observer: Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], None] | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def platform(self) -> str:
        return PLATFORMS.get(self.manifest.runtime.name, self.manifest.runtime.name)

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.runtime_model.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.runtime_model.outputs

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.runtime_model.infer(inputs)
        if self.observer is not None:
            self.observer(inputs, outputs)
        return outputs


@dataclass
class ModelSlot:
    """The current model for one name; swaps atomically, drains the old one."""

    name: str
    current: LiveModel | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def lease(self) -> Iterator[LiveModel]:
        with self._lock:
            model = self.current
            if model is None:
                raise ModelNotReadyError(f"model {self.name!r} has no active version loaded")
            model.leases += 1
        try:
            yield model
        finally:
            with self._lock:
                model.leases -= 1
                close_now = model.retired and model.leases == 0 and not model.closed
                if close_now:
                    model.closed = True
            if close_now:
                _close(model)

    def swap(self, new: LiveModel | None) -> LiveModel | None:
        """Make ``new`` current; the old model is closed once its in-flight requests finish."""
        with self._lock:
            old, self.current = self.current, new
            close_now = False
            if old is not None and old is not new:
                old.retired = True
                close_now = old.leases == 0 and not old.closed
                if close_now:
                    old.closed = True
        if close_now and old is not None:
            _close(old)
        return old


def _close(model: LiveModel) -> None:
    log.info("closing %s %s (drained)", model.name, model.version)
    model.runtime_model.close()


class SwapListener:
    """Hooks the metrics (or anything else) can implement to hear about swaps."""

    def swapped(self, name: str, old: str | None, new: str | None) -> None:  # pragma: no cover - default no-op
        """Called after the slot ``name`` switched from version ``old`` to ``new``."""

    def rolled_back(self, name: str, reason: str) -> None:  # pragma: no cover - default no-op
        """Called after an install of ``name`` was rolled back."""


class ActiveModels:
    """The names with an active bundle in a store's ``state.json``: the models a device should serve.

    Called by readiness probes on the API's event loop, so it re-reads the file only when its
    ``stat`` changes; a file that cannot be read keeps the last names read (and logs why once).
    """

    def __init__(self, store: DeviceStore) -> None:
        self._store = store
        self._path = store.root / STATE_FILE
        self._key: tuple[int, int, int] | None = None
        self._names: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def __call__(self) -> frozenset[str]:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            key = None  # an empty store, or one whose state.json the store holds rebuilt in memory: ask it
        except OSError as exc:
            log.warning("cannot stat %s (%s); readiness keeps the models it knew", self._path, exc)
            return self._names
        else:
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if key is None or key != self._key:
                self._key = key
                try:
                    state = self._store.load_state()
                except (EdgepackError, OSError) as exc:
                    log.warning("cannot read %s (%s); readiness keeps the models it knew", self._path, exc)
                else:
                    self._names = frozenset(name for name, entry in state.models.items() if entry.active)
            return self._names


class LiveModels:
    """All slots of a device; the local API's model repository.

    ``expected``: returns the names the device should serve (see the module docstring); none by default.
    """

    def __init__(
        self, listener: SwapListener | None = None, *, expected: Callable[[], Iterable[str]] | None = None
    ) -> None:
        self._slots: dict[str, ModelSlot] = {}
        self._lock = threading.Lock()
        self._failures: dict[str, str] = {}
        self._required: set[str] = set()
        self._expected = expected
        self.listener = listener or SwapListener()
        # gives a model being swapped in its field-data observer (drift, capture); None: nothing watched
        self.observer_factory: Callable[[LiveModel], Any] | None = None

    def require(self, name: str) -> None:
        """The server is not ready until ``name`` serves (e.g. the bundle ``edgepack serve`` was given)."""
        with self._lock:
            self._required.add(name)

    def should_serve(self) -> set[str]:
        """Every name the device should serve: ``expected`` plus the names given to :meth:`require`."""
        with self._lock:
            names = set(self._required)
        if self._expected is not None:
            names.update(self._expected())
        return names

    def slot(self, name: str) -> ModelSlot:
        with self._lock:
            return self._slots.setdefault(name, ModelSlot(name))

    def swap(self, name: str, new: LiveModel | None) -> LiveModel | None:
        if new is not None and self.observer_factory is not None:
            try:
                new.observer = self.observer_factory(new)
            except Exception:  # field data must never keep a model from serving
                log.exception("no field data for %s %s", new.name, new.version)
        old = self.slot(name).swap(new)
        self.listener.swapped(name, old.version if old else None, new.version if new else None)
        return old

    def current(self, name: str) -> LiveModel | None:
        slot = self._slots.get(name)
        return slot.current if slot else None

    def names(self) -> list[str]:
        return sorted(n for n, s in self._slots.items() if s.current is not None)

    def note_failure(self, name: str, reason: str) -> None:
        """Record why the last install of ``name`` failed (shown in the repository index)."""
        self._failures[name] = reason
        self.slot(name)  # a failed model is listed in the index, with the reason
        self.listener.rolled_back(name, reason)

    def close_all(self) -> None:
        for slot in list(self._slots.values()):
            slot.swap(None)

    def _why_not(self, name: str) -> str:
        """Why ``name`` has no model in its slot."""
        failure = self._failures.get(name)
        return f"not loaded: {failure}" if failure else "not loaded yet"

    def _unknown(self, name: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"unknown model {name!r}; this device serves {', '.join(self.names()) or 'nothing yet'}"
        )

    # --- ModelRepository protocol ---------------------------------------------------------------

    @contextlib.contextmanager
    def acquire(self, name: str, version: str | None = None) -> Iterator[LiveModel]:
        slot = self._slots.get(name)
        if slot is None:
            if name in self.should_serve():
                raise ModelNotReadyError(f"model {name!r} is {self._why_not(name)}")
            raise self._unknown(name)
        with slot.lease() as model:
            if version is not None and version != model.version:
                raise ModelNotFoundError(f"model {name!r} has no version {version!r}; it serves {model.version}")
            yield model

    def ready(self, name: str, version: str | None = None) -> bool:
        if name not in self._slots and name not in self.should_serve():
            raise self._unknown(name)
        model = self.current(name)
        if model is not None and version is not None and version != model.version:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}; it serves {model.version}")
        return model is not None

    def index(self) -> list[dict[str, Any]]:
        entries = []
        for name in sorted(set(self._slots) | self.should_serve()):
            model = self.current(name)
            if model is not None:
                reason = self._failures.get(name, "")
                entries.append({"name": name, "version": model.version, "state": "READY", "reason": reason})
            else:
                reason = self._failures.get(name) or "not loaded yet"
                entries.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": reason})
        return entries

    def unready_models(self) -> dict[str, str]:
        return {name: self._why_not(name) for name in sorted(self.should_serve()) if self.current(name) is None}

    def server_ready(self) -> bool:
        return not self.unready_models()
