"""The local inference API as an ASGI application: KServe v2 / Open Inference Protocol over HTTP.

This is the transport: it routes URLs, admits inference requests under the load bound
(:mod:`~edgepack.agent.api.admission`: 503 with ``Retry-After`` past it), reads the body under a size cap,
checks the bearer token, runs inference on a thread pool (never on the event loop) and maps errors to
status codes with a JSON ``{"error": "..."}`` body. What each endpoint does lives in
:mod:`~edgepack.agent.api.dataplane`.

A plain ASGI callable with a tiny router rather than Starlette/FastAPI: the API has a dozen fixed routes,
and measured on the tiny model (same dataplane, uvicorn+httptools+uvloop, 2 cores, 4000 sequential binary
requests, three rounds) the plain app cost ~525 µs of server CPU per request against ~660 µs under
Starlette (~1190 vs ~935 req/s at concurrency 1). It also keeps the device install smaller.

    GET  /v2/health/live  /v2/health/ready                     open even when a token is set (ready names
                                                               the models it waits for only to a client
                                                               with the token)
    GET  /v2                                                   server metadata
    GET  /v2/models/{name}[/versions/{v}]                      model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer                JSON or binary tensor data
    POST /v2/repository/index
    GET  /metrics                                              Prometheus text
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgepack.agent.api.admission import RETRY_AFTER_S, Admission, Ticket, default_max_bytes, default_max_requests
from edgepack.agent.api.codec import load_json
from edgepack.agent.api.dataplane import DataPlane
from edgepack.agent.api.metrics import UNKNOWN_MODEL, ApiMetrics
from edgepack.agent.api.repository import ModelRepository
from edgepack.errors import (
    BadRequestError,
    InferenceInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    RequestTooLargeError,
    ServerOverloadedError,
    UnauthorizedError,
)

__all__ = ["DEFAULT_MAX_BODY_BYTES", "InferenceApp", "check_bearer", "default_workers", "status_of"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
_INDEX_BODY_BYTES = 64 * 1024  # a repository index request is '{"ready": true}' at most

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = b"application/json"
_OCTETS = b"application/octet-stream"


def default_workers() -> int:
    """Inference threads when none are configured: one per core, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


class _HttpError(Exception):
    """A routing failure (no such path, wrong method) answered with ``status``."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []


class _ClientGone(Exception):
    """The client disconnected before its body arrived; there is no one to answer."""


_Response = tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]  # status, body, content type, headers


def status_of(exc: Exception) -> tuple[int, str]:
    """The HTTP status and the metrics outcome for an exception (the gRPC transport maps the status on)."""
    if isinstance(exc, (BadRequestError, InferenceInputError)):
        return 400, "bad_request"
    if isinstance(exc, ModelNotFoundError):
        return 404, "not_found"
    if isinstance(exc, ModelNotReadyError):
        return 503, "not_ready"
    if isinstance(exc, ServerOverloadedError):
        return 503, "overloaded"
    if isinstance(exc, RequestTooLargeError):
        return 413, "too_large"
    if isinstance(exc, UnauthorizedError):
        return 401, "unauthorized"
    if isinstance(exc, _HttpError):
        return exc.status, "bad_request"
    return 500, "error"


class InferenceApp:
    """The ASGI application. ``close()`` (or ASGI lifespan shutdown) stops its inference threads.

    ``token``: when set, every endpoint but health requires ``Authorization: Bearer <token>``.
    ``max_body_bytes``: cap on a request body, after decompression too. ``workers``: inference threads.
    ``max_concurrent_requests``/``max_queued_bytes``: the load bound on inference requests in flight and
    their bodies (None: derived from ``workers`` and ``max_body_bytes``, see
    :mod:`~edgepack.agent.api.admission`).
    """

    def __init__(
        self,
        repository: ModelRepository,
        *,
        metrics: ApiMetrics | None = None,
        token: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        workers: int | None = None,
        max_concurrent_requests: int | None = None,
        max_queued_bytes: int | None = None,
    ) -> None:
        self.dataplane = DataPlane(repository)
        self.metrics = metrics if metrics is not None else ApiMetrics()
        self._token = token.encode() if token else None
        self._max_body = max_body_bytes
        workers = workers or default_workers()
        self.workers = workers  # inference threads (the gRPC transport runs as many inferences at once)
        self.admission = Admission(
            max_concurrent_requests or default_max_requests(workers),
            max_queued_bytes or default_max_bytes(max_body_bytes),
            self.metrics,
        )
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgepack-infer")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- dispatch --------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self._dispatch(scope, receive)
        except _ClientGone:
            return
        except Exception as exc:  # the one place that answers every failure, so none takes the server down
            status, _ = status_of(exc)
            if status == 500:
                log.exception("%s %s failed", scope.get("method"), scope.get("path"))
                message = f"internal error: {type(exc).__name__}: {exc}"
            else:
                log.debug("%s %s -> %d: %s", scope.get("method"), scope.get("path"), status, exc)
                message = str(exc)
            headers = list(getattr(exc, "headers", []))
            if isinstance(exc, ServerOverloadedError):
                headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
            if status == 401:
                headers.append((b"www-authenticate", b"Bearer"))
            if status == 413:
                headers.append((b"connection", b"close"))  # the rest of the body is left unread
            response = (status, _json_bytes({"error": message}), _JSON, headers)
        status, body, content_type, headers = response
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _dispatch(self, scope: Scope, receive: Receive) -> _Response:
        method: str = scope["method"]
        parts = scope["path"].strip("/").split("/")
        if parts[:2] == ["v2", "health"] and len(parts) == 3:
            _allow(method, "GET")
            if parts[2] == "live":
                return _ok({"live": True})
            if parts[2] == "ready":
                return self._server_ready(scope)
        self._authorize(scope)
        if parts == ["v2"]:
            _allow(method, "GET")
            return _ok(self.dataplane.server_metadata())
        if parts[:2] == ["v2", "models"] and len(parts) >= 3:
            return await self._model_route(method, parts[2:], scope, receive)
        if parts == ["v2", "repository", "index"]:
            _allow(method, "POST")
            body = await self._read_body(scope, receive, cap=_INDEX_BODY_BYTES)
            request = load_json(body, "the repository index request") if body.strip() else None
            return _ok(self.dataplane.repository_index(request))
        if parts == ["metrics"]:
            _allow(method, "GET")
            text, content_type = self.metrics.render()
            return (200, text, content_type.encode(), [])
        raise _HttpError(404, f"no such endpoint: {scope['path']}")

    async def _model_route(self, method: str, parts: list[str], scope: Scope, receive: Receive) -> _Response:
        name, rest = parts[0], parts[1:]
        version: str | None = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2 or not rest[1]:
                raise _HttpError(404, f"no such endpoint: {scope['path']}")
            version, rest = rest[1], rest[2:]
        if len(rest) > 1:
            raise _HttpError(404, f"no such endpoint: {scope['path']}")
        action = rest[0] if rest else None
        if action is None:
            _allow(method, "GET")
            return _ok(self.dataplane.model_metadata(name, version))
        if action == "ready":
            _allow(method, "GET")
            ready, why = self.dataplane.model_readiness(name, version)
            if ready:
                return _ok({"name": name, "ready": True})
            return (503, _json_bytes({"name": name, "ready": False, "reason": why}), _JSON, [])
        if action == "infer":
            _allow(method, "POST")
            return await self._infer(name, version, scope, receive)
        raise _HttpError(404, f"no such endpoint: {scope['path']}")

    def _server_ready(self, scope: Scope) -> _Response:
        """200 when every model the device should serve is loaded and self-tested; else 503 naming them
        (and why) to a client allowed to see model names (the token, when one is set)."""
        unready = self.dataplane.unready_models()
        if not unready:
            return _ok({"ready": True})
        doc: dict[str, Any] = {"ready": False}
        try:
            self._authorize(scope)
        except UnauthorizedError:
            doc["not_ready"] = len(unready)  # how many, not which: health stays open without the token
        else:
            doc["not_ready"] = unready
        return (503, _json_bytes(doc), _JSON, [])

    def _authorize(self, scope: Scope) -> None:
        if self._token is not None:
            check_bearer(_header(scope, b"authorization"), self._token, "'Authorization: Bearer <token>'")

    # --- inference -------------------------------------------------------------------------------

    async def _infer(self, name: str, version: str | None, scope: Scope, receive: Receive) -> _Response:
        started = time.perf_counter()
        label = name
        ticket: Ticket | None = None
        try:
            ticket = self.admission.admit(self._declared_size(scope, self._max_body))
            body = await self._read_body(scope, receive, ticket=ticket)
            header_length = _header_length(scope)
            loop = asyncio.get_running_loop()
            encoded = await loop.run_in_executor(self._pool, self.dataplane.infer, name, version, body, header_length)
        except _ClientGone:
            raise
        except Exception as exc:
            status, outcome = status_of(exc)
            if isinstance(exc, ModelNotFoundError) or (outcome == "overloaded" and not self.dataplane.knows(name)):
                label = UNKNOWN_MODEL  # never let clients mint label values
            self.metrics.requests.labels(label, outcome).inc()
            if status >= 500 and outcome != "overloaded":
                self.metrics.failures.labels(label, type(exc).__name__).inc()
            raise
        finally:
            if ticket is not None:
                ticket.release()
        self.metrics.requests.labels(label, "ok").inc()
        self.metrics.latency.labels(label).observe(time.perf_counter() - started)
        if encoded.header_length is None:
            return (200, encoded.body, _JSON, [])
        header = (b"inference-header-content-length", str(encoded.header_length).encode())
        return (200, encoded.body, _OCTETS, [header])

    @staticmethod
    def _declared_size(scope: Scope, cap: int) -> int:
        """The body size ``Content-Length`` declares (0 when absent); 413 when it is past ``cap``."""
        declared = _header(scope, b"content-length")
        if declared is None or not declared.isdigit():
            return 0
        size = int(declared)
        if size > cap:
            raise RequestTooLargeError(f"the body has {size} bytes; this server takes at most {cap}")
        return size

    async def _read_body(
        self, scope: Scope, receive: Receive, *, cap: int | None = None, ticket: Ticket | None = None
    ) -> bytes:
        """The request body (decompressed), at most ``cap`` bytes (default: the body cap); ``ticket``
        grows with it, so a body larger than it declared is refused (503) once it no longer fits."""
        cap = self._max_body if cap is None else cap
        self._declared_size(scope, cap)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                raise RequestTooLargeError(f"the body is larger than this server's cap of {cap} bytes")
            if ticket is not None:
                ticket.grow(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        encoding = _header(scope, b"content-encoding")
        if encoding is None or encoding.lower() == b"identity":
            return body
        data = _decompress(body, encoding.lower(), cap)
        if ticket is not None:
            ticket.grow(len(data))
        return data


def check_bearer(value: bytes | None, token: bytes, how: str) -> None:
    """UnauthorizedError unless ``value`` (an Authorization value) is ``Bearer <token>`` (constant-time);
    ``how`` says how to send it, for the message. Both transports (HTTP, gRPC) check the token here."""
    if value is None:
        raise UnauthorizedError(f"this API needs a bearer token: send {how}")
    scheme, _, given = value.partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), token):
        raise UnauthorizedError("the bearer token is wrong")


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise _HttpError(405, f"method {method} is not allowed here; use {allowed}", [(b"allow", allowed.encode())])


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _header_length(scope: Scope) -> int | None:
    value = _header(scope, b"inference-header-content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequestError(f"Inference-Header-Content-Length is not a number: {value.decode('latin-1')!r}") from None


def _decompress(body: bytes, encoding: bytes, cap: int) -> bytes:
    """``gzip``/``deflate`` request bodies (tritonclient's request compression), capped at ``cap`` bytes."""
    if encoding == b"gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == b"deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise BadRequestError(f"Content-Encoding {encoding.decode('latin-1')!r} is not supported; use gzip or deflate")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, cap + 1)
    except zlib.error as exc:
        raise BadRequestError(f"the {encoding.decode()} body cannot be decompressed: {exc}") from None
    if len(data) > cap:
        raise RequestTooLargeError(f"the decompressed body is larger than this server's cap of {cap} bytes")
    if not inflater.eof:
        raise BadRequestError(f"the {encoding.decode()} body is truncated")
    return data


def _json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _ok(doc: Any) -> _Response:
    return (200, _json_bytes(doc), _JSON, [])
