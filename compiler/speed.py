"""Latency of a model on this host's CPU: what the int8 report quotes as "speed vs fp32".

:func:`median_ms` is the one timing loop every runtime family uses: median wall time of single calls,
after a warm-up, bounded by a time budget so compiling a large model does not spend minutes timing it.
:func:`latency_ms` times an ONNX model on a raw onnxruntime CPU session (the same kernels the backend
uses; a raw session lets us pin the threads and skip per-call signature checks that would blur
sub-millisecond timings).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from edgepack.compiler.runner import raw_session


def median_ms(run: Callable[[], object], *, budget_s: float = 1.0, min_runs: int = 5, max_runs: int = 200) -> float:
    """Median milliseconds of ``run()`` after one warm-up call (the first run allocates and picks kernels)."""
    run()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < max_runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def latency_ms(
    model: Path, feed: Mapping[str, np.ndarray], *, threads: int = 1, budget_s: float = 1.0, min_runs: int = 5
) -> float:
    """Median milliseconds per inference of ``model`` on ``feed``."""
    session = raw_session(model, threads=threads)
    feed = dict(feed)
    return median_ms(lambda: session.run(None, feed), budget_s=budget_s, min_runs=min_runs)
