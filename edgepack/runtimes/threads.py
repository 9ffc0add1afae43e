"""One bounded budget of CPU threads shared by every model a process loads, and per-model run limits.

Left alone, every runtime sizes itself as if it had the machine: each onnxruntime session starts an
intra-op pool of one thread per core whose idle threads *spin* (busy-wait) for work, OpenVINO pins its
streams to cores, and every request the API admits runs at once. On a two-core device serving three
models that is six spinning threads and N concurrent runs fighting for two cores: each model's latency
then depends on what the others do. With a budget of ``total`` threads:

- each model's runtime gets ``threads`` intra-op threads (at most ``total``), one inter-op thread, and
  no spinning (ORT ``session.intra_op.allow_spinning = 0`` and ``inter_op``; OpenVINO
  ``ENABLE_CPU_PINNING = false`` and one stream; LiteRT has no spin setting, only ``num_threads``), so
  idle sessions cost nothing;
- a run takes as many *units* of the budget as its model has threads and waits (first come, first
  served) until they are free, so the threads running across all models never exceed ``total``;
- each model also runs at most ``max_concurrency`` requests at once (default: as many as fit in the
  budget), so one busy model cannot take the whole budget from the others for long.

A weighted semaphore is written here rather than taken from a library: the standard library has only
unit semaphores, and the fairness (FIFO, so a model asking for all units is not starved by one-unit
runs) is the point.

Usage::

    budget = ThreadBudget(total=2)
    options = budget.runtime_options(RuntimeOptions(threads=1))   # 1 intra, 1 inter, no spinning
    model = budget.bound(get_backend("onnxruntime").load(path, options=options), threads=1)
    model.infer(feeds)                                            # waits for a unit of the budget
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from edgepack.runtimes.base import LoadedModel, RuntimeOptions

__all__ = ["BudgetedModel", "ThreadBudget", "available_cores"]

log = logging.getLogger(__name__)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on every platform
        return max(1, os.cpu_count() or 1)


class ThreadBudget:
    """``total`` threads for every model of the process (default: the cores); see the module docstring."""

    def __init__(self, total: int | None = None) -> None:
        self.total = total if total is not None else available_cores()
        if self.total < 1:
            raise ValueError(f"a thread budget needs at least one thread, got {self.total}")
        self._free = self.total
        self._waiting: collections.deque[tuple[int, threading.Event]] = collections.deque()
        self._lock = threading.Lock()
        self.in_use_peak = 0  # the most units ever taken at once (tests and diagnostics)

    def threads_for(self, requested: int | None) -> int:
        """A model's intra-op threads: what it asks for (default: the whole budget), at most the budget."""
        return max(1, min(requested or self.total, self.total))

    def runtime_options(self, base: RuntimeOptions) -> RuntimeOptions:
        """``base`` with the budget's thread settings: bounded intra-op threads, one inter-op, no spinning."""
        return dataclasses.replace(base, threads=self.threads_for(base.threads), inter_threads=1, spinning=False)

    def bound(self, model: LoadedModel, *, threads: int, max_concurrency: int | None = None) -> BudgetedModel:
        """``model`` with every run taking ``threads`` units of the budget (see the module docstring)."""
        return BudgetedModel(model, self, threads=self.threads_for(threads), max_concurrency=max_concurrency)

    @contextlib.contextmanager
    def take(self, units: int) -> Iterator[None]:
        """Hold ``units`` of the budget for the block; waits, first come first served, until they are free."""
        units = min(units, self.total)
        with self._lock:
            if not self._waiting and self._free >= units:
                self._free -= units
                event = None
            else:
                event = threading.Event()
                self._waiting.append((units, event))
        if event is not None:
            event.wait()
        with self._lock:
            self.in_use_peak = max(self.in_use_peak, self.total - self._free)
        try:
            yield
        finally:
            with self._lock:
                self._free += units
                while self._waiting and self._waiting[0][0] <= self._free:
                    wanted, waiter = self._waiting.popleft()
                    self._free -= wanted
                    waiter.set()


class BudgetedModel(LoadedModel):
    """A loaded model whose runs hold their share of a :class:`ThreadBudget` and a per-model limit."""

    def __init__(
        self, inner: LoadedModel, budget: ThreadBudget, *, threads: int, max_concurrency: int | None = None
    ) -> None:
        self.inner = inner
        self.inputs = inner.inputs
        self.outputs = inner.outputs
        self.threads = threads
        self.max_concurrency = max_concurrency or max(1, budget.total // threads)
        self._budget = budget
        self._slots = threading.BoundedSemaphore(self.max_concurrency)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._slots, self._budget.take(self.threads):
            return self.inner.infer(inputs)

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> dict[str, Any]:
        return {
            **self.inner.describe(),
            "thread_budget": self._budget.total,
            "budget_threads": self.threads,
            "max_concurrency": self.max_concurrency,
        }
