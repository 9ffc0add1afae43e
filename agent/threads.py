"""How the agent serves each model it loads: the shared thread budget, per-model limits, dynamic batching.

The settings are ``[runtime] thread_budget`` and ``[models.NAME]`` in agent.toml
(:class:`~edgepack.agent.config.ModelServingSettings`); the mechanisms live in
:mod:`edgepack.runtimes.threads` (budget, per-model concurrency) and :mod:`edgepack.agent.api.batching`.
The installer asks this plan for a model's runtime options before it loads it and wraps the loaded
model after its warm-up, so what the API leases is the wrapped model: batcher outside, budget inside
(a batch takes its model's threads once, not once per request).

- ``thread_budget`` unset and no ``[models.NAME]``: models load and run as before (the runtime's
  defaults, every admitted request runs at once).
- ``thread_budget = N``: every model's runtime gets bounded threads, one inter-op thread and no
  spinning, and its runs share the N threads (``edgepack/runtimes/threads.py``).
- ``max_concurrency``: at most that many runs of the model at once (with or without a budget).
- ``max_batch_size > 1``: dynamic batching, on by default where the device has two cores or more (on
  one core the queue delay is latency with no second core to overlap work on; ``batching = true``
  turns it on there too); only for runtimes that take any batch size (onnxruntime, OpenVINO) and
  models whose inputs and outputs have a dynamic first dimension, otherwise logged and left off.

Usage::

    plan = ServingPlan.from_config(config)
    model = backend.load(path, options=plan.runtime_options(name, options))
    model = plan.wrap(name, manifest.runtime.name, model)
"""

from __future__ import annotations

import dataclasses
import logging

from edgepack.agent.api.batching import BatchingModel, BatchingPolicy, batchable
from edgepack.agent.config import AgentConfig, ModelServingSettings
from edgepack.runtimes.base import LoadedModel, RuntimeOptions
from edgepack.runtimes.threads import BudgetedModel, ThreadBudget, available_cores

__all__ = ["ServingPlan"]

log = logging.getLogger(__name__)

BATCHING_RUNTIMES = frozenset({"onnxruntime", "openvino"})  # LiteRT interpreters here keep fixed shapes


class ServingPlan:
    """The agent's thread budget (None: unbounded) and per-model settings, applied model by model."""

    def __init__(
        self,
        budget: ThreadBudget | None = None,
        models: dict[str, ModelServingSettings] | None = None,
        *,
        threads: int | None = None,
        cores: int | None = None,
    ) -> None:
        self.budget = budget
        self.models = models or {}
        self.threads = threads  # every model's intra-op threads unless its own section says (runtime.threads)
        self.cores = cores if cores is not None else available_cores()

    @classmethod
    def from_config(cls, config: AgentConfig) -> ServingPlan:
        budget = ThreadBudget(config.runtime.thread_budget) if config.runtime.thread_budget else None
        return cls(budget, dict(config.models), threads=config.runtime.threads)

    @property
    def batch_threads(self) -> int:
        """The API inference threads batching needs (1: no model batches): a model's batches of
        ``max_batch_size`` form only while that many requests wait in them, for each batch it runs at once."""
        needs = [s.max_batch_size * self._concurrent_batches(s) for s in self.models.values() if self._batching_on(s)]
        return max(needs or [1])

    def runtime_options(self, name: str, base: RuntimeOptions) -> RuntimeOptions:
        settings = self.models.get(name)
        if settings is not None and settings.threads is not None:
            base = dataclasses.replace(base, threads=settings.threads)
        return self.budget.runtime_options(base) if self.budget is not None else base

    def wrap(self, name: str, runtime: str, model: LoadedModel) -> LoadedModel:
        """``model`` under its share of the budget, its concurrency limit and its batcher, as configured."""
        settings = self.models.get(name, ModelServingSettings())
        if self.budget is not None:
            threads = self.budget.threads_for(settings.threads or self.threads)  # as runtime_options gave it
            model = self.budget.bound(model, threads=threads, max_concurrency=settings.max_concurrency)
        elif settings.max_concurrency is not None:
            model = _Limited(model, settings.max_concurrency)
        if not self._batching_on(settings):
            return model
        why = batchable(model.inputs, model.outputs)
        if runtime not in BATCHING_RUNTIMES:
            why = f"the {runtime} runtime here takes fixed input shapes"
        if why is not None:
            log.warning("model %s: dynamic batching left off: %s", name, why)
            return model
        policy = BatchingPolicy(
            settings.max_batch_size,
            settings.max_queue_delay_us,
            tuple(settings.preferred_batch_sizes),
            max_concurrent_batches=self._concurrent_batches(settings),
        )
        return BatchingModel(model, policy, name=name)

    def _concurrent_batches(self, settings: ModelServingSettings) -> int:
        """Batches of one model run at once: as many as its runtime threads leave cores (or budget) for."""
        threads = settings.threads or self.threads
        if self.budget is not None:
            return max(1, self.budget.total // self.budget.threads_for(threads))
        return max(1, self.cores // threads) if threads else 1  # the runtime's default takes every core

    def _batching_on(self, settings: ModelServingSettings) -> bool:
        if settings.max_batch_size < 2:
            return False
        return settings.batching if settings.batching is not None else self.cores > 1


class _Limited(BudgetedModel):
    """A per-model concurrency limit without a budget: a budget as wide as the limit, its own."""

    def __init__(self, inner: LoadedModel, max_concurrency: int) -> None:
        super().__init__(inner, ThreadBudget(max_concurrency), threads=1, max_concurrency=max_concurrency)

