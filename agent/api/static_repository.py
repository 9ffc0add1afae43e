"""A fixed set of loaded models behind the :class:`ModelRepository` protocol: no swap, no rollback.

For serving models that are loaded once (benchmarks, demos, embedding the API in a tool) and as the
simplest repository tests can use. The agent's real repository, with hot swap, lives elsewhere.

Usage::

    repository = StaticRepository([model_a, model_b])     # the last of each name is the active one
    serve(repository)
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from edgepack.agent.api.repository import ServedModel
from edgepack.errors import ModelNotFoundError, ModelNotReadyError

__all__ = ["StaticRepository"]


class StaticRepository:
    """Serves ``models``; several versions of one name may be given, the last is the active one.

    ``set_ready(name, False)`` marks a model not ready (its requests answer 503), e.g. while a caller
    warms it up.
    """

    def __init__(self, models: Iterable[ServedModel]) -> None:
        self._models: dict[str, dict[str, ServedModel]] = {}
        self._active: dict[str, str] = {}
        for model in models:
            self._models.setdefault(model.name, {})[model.version] = model
            self._active[model.name] = model.version
        self._not_ready: set[str] = set()
        self._lock = threading.Lock()

    def set_ready(self, name: str, ready: bool) -> None:
        self._lookup(name, None)
        with self._lock:
            if ready:
                self._not_ready.discard(name)
            else:
                self._not_ready.add(name)

    @contextmanager
    def acquire(self, name: str, version: str | None = None) -> Iterator[ServedModel]:
        model = self._lookup(name, version)
        if name in self._not_ready:
            raise ModelNotReadyError(f"model '{name}' is not ready")
        yield model

    def ready(self, name: str, version: str | None = None) -> bool:
        self._lookup(name, version)
        return name not in self._not_ready

    def index(self) -> list[dict[str, str]]:
        return [
            {
                "name": name,
                "version": version,
                "state": "READY" if name not in self._not_ready else "UNAVAILABLE",
                "reason": "" if name not in self._not_ready else "not ready",
            }
            for name, versions in self._models.items()
            for version in versions
        ]

    def unready_models(self) -> dict[str, str]:
        with self._lock:
            return {name: "not ready" for name in sorted(self._not_ready)}

    def server_ready(self) -> bool:
        return not self._not_ready

    def _lookup(self, name: str, version: str | None) -> ServedModel:
        versions = self._models.get(name)
        if versions is None:
            raise ModelNotFoundError(f"unknown model '{name}'")
        key = self._active[name] if version is None else version
        model = versions.get(key)
        if model is None:
            known = ", ".join(versions)
            raise ModelNotFoundError(f"model '{name}' has no version '{version}'; it has {known}")
        return model
