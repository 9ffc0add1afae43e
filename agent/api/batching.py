"""Dynamic batching: requests for one model that arrive close together run as one batch.

A runtime call has a fixed cost (dispatch, thread wake-up, small-kernel overhead) that a batch of N
pays once; for a CNN on a CPU, one call on a batch of 8 is cheaper than eight calls. A
:class:`BatchingModel` wraps a loaded model whose inputs and outputs all have a dynamic first (batch)
dimension. Callers (the API's inference threads) call :meth:`BatchingModel.infer` as before and block;
``max_concurrent_batches`` batcher threads per model (one gathers while the others run; set it to the
cores the model's runtime threads leave room for, so a batch on one thread does not leave a core idle):

- takes the oldest waiting request and gathers the requests of the *same shape and datatypes* (apart
  from the batch dimension) behind it — requests of other shapes are never mixed in, they wait for a
  batch of their own — until the rows reach ``max_batch_size``, or the rows reach a size in
  ``preferred_batch_sizes`` and no more such requests are waiting, or ``max_queue_delay_us`` has passed
  since the oldest arrived;
- waits for that delay only while another batch of the model is running (its callers are the ones who
  will send the next requests): a model that is idle runs a lone request at once, so batching costs a
  request at concurrency 1 nothing;
- concatenates each input along the batch dimension, runs the model once, and splits every output back
  by each request's own rows, in order, so each answer goes to its own request;
- when the batched run fails, runs each of its requests alone, so a request the model refuses fails on
  its own and its neighbours still get their answers (errors isolated per request).

A request with more rows than ``max_batch_size``, or whose inputs disagree on their batch size, runs
alone, unbatched. Batching is for runtimes that take any batch size: onnxruntime and OpenVINO with a
dynamic first dimension; LiteRT interpreters here have fixed shapes (see ``agent/threads.py``).

Usage::

    model = BatchingModel(loaded, BatchingPolicy(max_batch_size=8, max_queue_delay_us=2000), name="resnet")
    outputs = model.infer({"input": x})      # from many threads at once
    model.close()                             # stops the batcher thread, then closes ``loaded``
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepack.errors import ConfigError, RuntimeBackendError
from edgepack.manifest import TensorSpec
from edgepack.runtimes.base import LoadedModel

__all__ = ["BatchingModel", "BatchingPolicy", "batchable"]

log = logging.getLogger(__name__)

_Key = tuple[tuple[str, str, tuple[int, ...]], ...]  # (input name, dtype, shape without the batch dim)


@dataclass(frozen=True)
class BatchingPolicy:
    """``max_batch_size`` rows per run; wait at most ``max_queue_delay_us`` for more; stop early at a
    preferred size when no more requests of that shape are waiting."""

    max_batch_size: int
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    max_concurrent_batches: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 2:
            raise ConfigError(f"max_batch_size must be 2 or more to batch, got {self.max_batch_size}")
        if self.max_concurrent_batches < 1:
            raise ConfigError(f"max_concurrent_batches must be 1 or more, got {self.max_concurrent_batches}")
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"max_queue_delay_us must not be negative, got {self.max_queue_delay_us}")
        bad = [s for s in self.preferred_batch_sizes if not 1 <= s <= self.max_batch_size]
        if bad:
            raise ConfigError(f"preferred_batch_sizes {bad} are not between 1 and max_batch_size {self.max_batch_size}")


def batchable(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str | None:
    """None when every input and output has a dynamic first dimension; else why the model cannot batch."""
    for role, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            if not spec.shape or isinstance(spec.shape[0], int):
                return f"{role} '{spec.name}' has no dynamic batch dimension (shape {list(spec.shape)})"
    return None


@dataclass
class _Pending:
    inputs: Mapping[str, np.ndarray]
    key: _Key
    rows: int
    arrived: float
    future: Future[dict[str, np.ndarray]] = field(default_factory=Future)


class BatchingModel(LoadedModel):
    """``inner`` behind a dynamic batcher (see the module docstring); ``infer`` is thread-safe."""

    def __init__(self, inner: LoadedModel, policy: BatchingPolicy, *, name: str = "model") -> None:
        why = batchable(inner.inputs, inner.outputs)
        if why is not None:
            raise ConfigError(f"model {name!r} cannot be batched: {why}")
        self.inner = inner
        self.inputs = inner.inputs
        self.outputs = inner.outputs
        self.policy = policy
        self.requests = 0  # requests that went through the batcher (diagnostics)
        self.batches_run = 0  # batched runs (of two requests or more), for tests and diagnostics
        self.rows_batched = 0
        self._name = name
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._gathering = threading.Lock()  # one batcher gathers at a time; the others run what they gathered
        self._running = 0  # batches running now
        self._closed = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"edgepack-batch-{name}-{i}", daemon=True)
            for i in range(policy.max_concurrent_batches)
        ]
        for thread in self._threads:
            thread.start()

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in inputs.values()}
        if len(rows) != 1 or (n := rows.pop()) < 1 or n > self.policy.max_batch_size:
            return self.inner.infer(inputs)  # no common batch size, empty, or larger than a batch: alone
        key = tuple(sorted((k, str(a.dtype), tuple(a.shape[1:])) for k, a in inputs.items()))
        pending = _Pending(inputs, key, n, time.monotonic())
        with self._cond:
            if self._closed:
                raise RuntimeBackendError(f"model {self._name!r} has been closed; load it again to run it")
            self._queue.append(pending)
            self.requests += 1
            self._cond.notify_all()
        return pending.future.result()

    @property
    def queued(self) -> int:
        """Requests waiting for a batch now."""
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(10.0)
        self.inner.close()

    def describe(self) -> dict[str, Any]:
        return {
            **self.inner.describe(),
            "batching": {
                "max_batch_size": self.policy.max_batch_size,
                "max_queue_delay_us": self.policy.max_queue_delay_us,
                "preferred_batch_sizes": list(self.policy.preferred_batch_sizes),
                "max_concurrent_batches": self.policy.max_concurrent_batches,
            },
        }

    # --- the batcher thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._gathering:
                batch = self._gather()
                if batch is None:
                    return
                with self._cond:
                    self._running += 1
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._running -= 1

    def _gather(self) -> list[_Pending] | None:
        """The next batch: the oldest request and those of its shape behind it (module docstring)."""
        policy = self.policy
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, rows = [first], first.rows
            deadline = first.arrived + policy.max_queue_delay_us / 1e6
            while rows < policy.max_batch_size:
                taken = self._take_same(first.key, policy.max_batch_size - rows)
                if taken is not None:
                    batch.append(taken)
                    rows += taken.rows
                    continue
                if rows in policy.preferred_batch_sizes or self._closed or not self._running:
                    break  # a preferred size, or an idle model, and nothing more of this shape waiting: go now
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return batch

    def _take_same(self, key: _Key, room: int) -> _Pending | None:
        for index, pending in enumerate(self._queue):
            if pending.key == key and pending.rows <= room:
                del self._queue[index]
                return pending
        return None

    def _run(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            self._run_alone(batch[0])
            return
        try:
            feeds = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
            results = self.inner.infer(feeds)
            parts = self._split(results, [p.rows for p in batch])
        except Exception as exc:  # one bad request must not fail its neighbours: run each alone
            log.debug("batched run of %d requests on %s failed (%s); running them one by one", len(batch), self._name, exc)
            for pending in batch:
                self._run_alone(pending)
            return
        self.batches_run += 1
        self.rows_batched += sum(p.rows for p in batch)
        for pending, part in zip(batch, parts, strict=True):
            pending.future.set_result(part)

    def _run_alone(self, pending: _Pending) -> None:
        try:
            pending.future.set_result(self.inner.infer(pending.inputs))
        except BaseException as exc:  # handed to the caller waiting on this request, raised there
            pending.future.set_exception(exc)

    def _split(self, results: Mapping[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
        total = sum(rows)
        for name, array in results.items():
            if np.ndim(array) == 0 or np.shape(array)[0] != total:
                raise RuntimeBackendError(
                    f"output '{name}' of a batch of {total} rows has shape {list(np.shape(array))}; "
                    "its first dimension is not the batch"
                )
        bounds = np.cumsum([0, *rows])
        return [
            {name: np.ascontiguousarray(array[bounds[i] : bounds[i + 1]]) for name, array in results.items()}
            for i in range(len(rows))
        ]
