"""The local API's load bound: how many inference requests may be in flight, and how many body bytes.

Without a bound, a burst of requests piles up in the inference thread pool's queue, every one holding its
body in memory, until the device runs out of it. Here a request is *admitted* before its body is read,
and answered 503 with ``Retry-After`` at once when either bound is reached:

- ``max_requests``: inference requests admitted and not yet answered (reading their body, waiting for
  an inference thread, running, being encoded). The default is a small multiple of the inference threads
  (:func:`default_max_requests`), so a short queue keeps the threads busy and no more.
- ``max_bytes``: the request bodies those requests hold (after decompression). A request reserves its
  declared ``Content-Length`` before a byte is read; a chunked or compressed body grows its reservation
  as it arrives and is refused mid-way when it no longer fits. A request is always admitted on bytes when
  nothing else is queued, so one body up to the body cap can always get through. The default is derived
  from the body cap and the device's memory (:func:`default_max_bytes`).

Admission, growth and release are integer updates under one lock: the HTTP transport calls them on its
event loop and the gRPC transport (``grpc_server.py``) on its own, and both share one bound. The counts are mirrored in the metrics' ``in_flight``/``queued_bytes`` gauges and every
refusal is counted in ``overloaded{limit}``.

Usage (what the transport does per inference request)::

    ticket = admission.admit(declared_bytes)        # ServerOverloadedError: answer 503 + Retry-After
    try:
        ticket.grow(bytes_read_so_far)               # for bodies larger than declared
        ...
    finally:
        ticket.release()
"""

from __future__ import annotations

import logging
import os
import threading

from edgepack.agent.api.metrics import ApiMetrics
from edgepack.errors import ServerOverloadedError

__all__ = ["RETRY_AFTER_S", "Admission", "Ticket", "default_max_bytes", "default_max_requests"]

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what the 503 tells a client to wait; a request on these models takes milliseconds
_REQUESTS_PER_THREAD = 4
_MEMORY_SHARE = 8  # queued bodies may take at most 1/8 of the device's memory by default


def default_max_requests(workers: int) -> int:
    """Requests in flight when none is configured: four per inference thread."""
    return _REQUESTS_PER_THREAD * max(1, workers)


def default_max_bytes(max_body_bytes: int) -> int:
    """Queued body bytes when none is configured: four bodies at the cap, but at most an eighth of the
    device's memory, and never less than one body at the cap."""
    bound = 4 * max_body_bytes
    memory = _physical_memory()
    if memory is not None:
        bound = min(bound, memory // _MEMORY_SHARE)
    return max(bound, max_body_bytes)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on every platform
        return None


class Ticket:
    """One admitted request: its place among those in flight and the body bytes it reserved."""

    def __init__(self, admission: Admission, reserved: int) -> None:
        self._admission = admission
        self.reserved = reserved
        self._released = False

    def grow(self, size: int) -> None:
        """Reserve up to ``size`` bytes in all; ServerOverloadedError when that no longer fits."""
        if size > self.reserved:
            self._admission._grow(self, size - self.reserved)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self)


class Admission:
    """The bound on inference requests in flight and their body bytes (see the module docstring)."""

    def __init__(self, max_requests: int, max_bytes: int, metrics: ApiMetrics) -> None:
        if max_requests < 1 or max_bytes < 1:
            raise ValueError(f"the load bound must be positive, got {max_requests} requests, {max_bytes} bytes")
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.in_flight = 0
        self.queued_bytes = 0
        self._metrics = metrics
        self._lock = threading.Lock()

    def admit(self, declared_bytes: int) -> Ticket:
        """Admit a request whose body declares ``declared_bytes`` (0 when unknown)."""
        with self._lock:
            return self._admit(declared_bytes)

    def _admit(self, declared_bytes: int) -> Ticket:
        if self.in_flight >= self.max_requests:
            self._refuse(
                "concurrency",
                f"the server is busy: {self.in_flight} inference requests are in flight, its bound is "
                f"{self.max_requests}; retry after {RETRY_AFTER_S} s",
            )
        self._check_bytes(declared_bytes)
        self.in_flight += 1
        self.queued_bytes += declared_bytes
        self._publish()
        return Ticket(self, declared_bytes)

    def _grow(self, ticket: Ticket, more: int) -> None:
        with self._lock:
            self._grow_locked(ticket, more)

    def _grow_locked(self, ticket: Ticket, more: int) -> None:
        self._check_bytes(more, own=ticket.reserved)
        ticket.reserved += more
        self.queued_bytes += more
        self._publish()

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            self.in_flight -= 1
            self.queued_bytes -= ticket.reserved
            self._publish()

    def _check_bytes(self, more: int, own: int = 0) -> None:
        others = self.queued_bytes - own  # a request alone is always let through (the body cap still holds)
        if more and others and self.queued_bytes + more > self.max_bytes:
            self._refuse(
                "queued_bytes",
                f"the server is busy: requests in flight hold {self.queued_bytes} body bytes and this one "
                f"needs {more} more, past its bound of {self.max_bytes}; retry after {RETRY_AFTER_S} s",
            )

    def _refuse(self, limit: str, message: str) -> None:
        self._metrics.overloaded.labels(limit).inc()
        log.debug("overloaded (%s): %s", limit, message)
        raise ServerOverloadedError(message)

    def _publish(self) -> None:
        self._metrics.in_flight.set(self.in_flight)
        self._metrics.queued_bytes.set(self.queued_bytes)
