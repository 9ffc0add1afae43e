"""Latency of a model on this host's CPU: what the int8 report quotes as "speed vs fp32".

Median wall time of single inferences on one real sample, after warm-up, with a fixed thread count, on a
raw onnxruntime CPU session (the same kernels the backend uses; a raw session lets us pin the threads
and skip per-call signature checks that would blur sub-millisecond timings). Bounded by a time budget so
compiling a large model does not spend minutes timing it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgepack.compiler.runner import raw_session


def latency_ms(
    model: Path, feed: Mapping[str, np.ndarray], *, threads: int = 1, budget_s: float = 1.0, min_runs: int = 5
) -> float:
    """Median milliseconds per inference of ``model`` on ``feed``."""
    session = raw_session(model, threads=threads)
    feed = dict(feed)
    session.run(None, feed)  # warm-up: first run allocates and picks kernels
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < 200):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)
