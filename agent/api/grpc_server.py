"""The local inference API over gRPC: KServe v2 ``inference.GRPCInferenceService`` on grpcio.

A second transport next to HTTP (``app.py``), on its own port (``grpc_port`` in agent.toml,
``edgepack serve --grpc-port N``; off when unset), sharing everything below the transport with it: the
same :class:`~edgepack.agent.api.dataplane.DataPlane`, the same load bound
(:class:`~edgepack.agent.api.admission.Admission`: one count of requests in flight and body bytes for
both transports), the same metrics and the same bearer token (gRPC metadata
``authorization: Bearer <token>``, which is what ``tritonclient.grpc``'s ``headers=`` sends).
``tritonclient.grpc`` works unchanged.

RPCs: ServerLive and ServerReady (open without the token, like ``/v2/health/*``), ModelReady,
ServerMetadata, ModelMetadata, ModelInfer (tensors in ``raw_input_contents``/``raw_output_contents``,
see :mod:`~edgepack.agent.api.grpc_codec`). Triton's optional RPCs (streaming, model config, statistics,
repository control, shared memory, trace, log settings) answer UNIMPLEMENTED.

Errors map to the status codes of the HTTP cases, with the same messages:

    400 bad request           INVALID_ARGUMENT      401 no/wrong token     UNAUTHENTICATED
    404 unknown model/version NOT_FOUND             413 body too large     RESOURCE_EXHAUSTED (grpcio's own
    503 not ready / busy      UNAVAILABLE (busy: trailing metadata         check of max_receive_message_length)
                              ``retry-after: 1``)   500 runtime failure    INTERNAL

**Threads, not asyncio.** grpcio's thread-pool server, with one handler thread per request the load
bound admits (plus a few for health and metadata; ``maximum_concurrent_rpcs`` refuses beyond them with
RESOURCE_EXHAUSTED at once), so a request is admitted or refused the moment it arrives, never queued in
front of the bound. ModelInfer takes the message as bytes (no deserializer), is admitted on its length,
then parsed, run and serialized on its handler thread, at most as many at once as HTTP has inference
threads (``InferenceApp.workers``). Measured on this project's 2-core host (bytes-echo servers, same
``grpc.aio`` client, server CPU per request from /proc): ``grpc.aio`` 0.23 ms at concurrency 16 and
0.27–0.30 ms at 1, the thread-pool server 0.12–0.13 ms and 0.17–0.26 ms. In the full server (tiny model),
handing each request from the ``grpc.aio`` loop to the inference pool cost 0.46 ms a request at 16
(py-spy: most of it in the loop thread); handing it from a handler thread to the pool and waiting,
0.36–0.55 ms; running it on the handler thread, 0.27–0.28 ms. Messages come from
:mod:`~edgepack.agent.api.grpc_proto` (a private descriptor pool: see there why not generated stubs).

Usage::

    grpc = GrpcServer(app, host="127.0.0.1", port=8001, token=None).start()
    client = tritonclient.grpc.InferenceServerClient(grpc.url)
    ...
    grpc.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from edgepack.agent.api.admission import RETRY_AFTER_S, Ticket
from edgepack.agent.api.app import DEFAULT_MAX_BODY_BYTES, InferenceApp, check_bearer
from edgepack.agent.api.app import status_of as http_status_of
from edgepack.agent.api.grpc_codec import encode_infer_response, parse_infer_request
from edgepack.agent.api.grpc_proto import METHODS, OPTIONAL_METHODS, SERVICE, messages
from edgepack.agent.api.metrics import UNKNOWN_MODEL
from edgepack.errors import BadRequestError, ConfigError, ServerOverloadedError

__all__ = ["GrpcServer", "status_of"]

log = logging.getLogger(__name__)

_SPARE_THREADS = 4  # handler threads beyond the load bound: health, readiness and metadata still answer
_OPEN = frozenset({"ServerLive", "ServerReady"})  # answered without the token, like /v2/health/*


# the gRPC code of each HTTP status the API answers with; anything else is INTERNAL
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and the metrics outcome for an exception: the HTTP transport's case, mapped."""
    status, outcome = http_status_of(exc)
    return _CODES.get(status, grpc.StatusCode.INTERNAL), outcome


class GrpcServer:
    """The gRPC transport over an :class:`InferenceApp`'s dataplane, bound, metrics and threads.

    ``max_body_bytes``: the largest request message (grpcio refuses larger ones, RESOURCE_EXHAUSTED).
    Start with :meth:`start` (returns once it listens; ``port`` 0 picks a free one), end with :meth:`stop`
    before the app is closed.
    """

    def __init__(
        self,
        app: InferenceApp,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self._app = app
        self._dataplane = app.dataplane
        self._metrics = app.metrics
        self._host = host
        self._port = port
        self._token = token.encode() if token else None
        self._max_body = max_body_bytes
        self._server: grpc.Server | None = None
        self._pool: ThreadPoolExecutor | None = None
        # as many inferences at once as the HTTP transport has inference threads
        self._inference_slots = threading.BoundedSemaphore(app.workers)
        self.port = port

    @property
    def url(self) -> str:
        """``host:port`` as ``tritonclient.grpc`` takes it."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self.port}"

    def start(self) -> GrpcServer:
        # one handler thread per request the bound admits, and a few for health and metadata beyond it:
        # a request is admitted (or refused) the moment it arrives, never queued in front of the bound
        threads = self._app.admission.max_requests + _SPARE_THREADS
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="edgepack-grpc")
        server = grpc.server(
            self._pool,
            handlers=(grpc.method_handlers_generic_handler(SERVICE, self._handlers()),),
            maximum_concurrent_rpcs=threads,  # past it grpcio answers RESOURCE_EXHAUSTED at once
            options=[
                ("grpc.max_receive_message_length", self._max_body),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),  # a second server on this port is an error, not a silent share
            ],
        )
        address = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen for gRPC on {address}: {exc}; choose another grpc_port") from exc
        if port == 0:
            raise ConfigError(f"cannot listen for gRPC on {address}; choose another grpc_port")
        server.start()
        self._server, self.port = server, port
        log.info("KServe v2 gRPC API on %s", self.url)
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let RPCs in flight finish for up to ``grace`` seconds."""
        if self._server is not None:
            if not self._server.stop(grace).wait(grace + 5.0):
                log.warning("the gRPC server did not stop within %.1f s", grace + 5.0)
            self._server = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # --- handlers --------------------------------------------------------------------------------

    def _handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        simple: dict[str, Callable[[Any], Any]] = {
            "ServerLive": lambda _: messages.ServerLiveResponse(live=True),
            "ServerReady": lambda _: messages.ServerReadyResponse(ready=self._dataplane.server_ready()),
            "ModelReady": self._model_ready,
            "ServerMetadata": lambda _: messages.ServerMetadataResponse(**self._dataplane.server_metadata()),
            "ModelMetadata": self._model_metadata,
        }
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for name, run in simple.items():
            request_type, response_type = (getattr(messages, n) for n in METHODS[name])
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                self._simple(name, run),
                request_deserializer=request_type.FromString,
                response_serializer=response_type.SerializeToString,
            )
        # ModelInfer: bytes in (admitted on their length before parsing), bytes out
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(self._model_infer)
        for name in OPTIONAL_METHODS:
            handlers[name] = grpc.unary_unary_rpc_method_handler(_unimplemented(name))
        return handlers

    def _simple(self, name: str, run: Callable[[Any], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                if name not in _OPEN:
                    self._authorize(context)
                return run(request)
            except Exception as exc:
                self._abort(context, exc, f"{name} failed")

        return handle

    def _model_ready(self, request: Any) -> Any:
        return messages.ModelReadyResponse(ready=self._dataplane.model_ready(request.name, request.version or None))

    def _model_metadata(self, request: Any) -> Any:
        doc = self._dataplane.model_metadata(request.name, request.version or None)
        response = messages.ModelMetadataResponse(name=doc["name"], versions=doc["versions"], platform=doc["platform"])
        for role in ("inputs", "outputs"):
            for tensor in doc[role]:
                getattr(response, role).add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        return response

    def _model_infer(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        started = time.perf_counter()
        ticket: Ticket | None = None
        holder: dict[str, str] = {}
        try:
            self._authorize(context)
            ticket = self._app.admission.admit(len(data))
            with self._inference_slots:
                body = self._infer(data, holder)
        except Exception as exc:
            _, outcome = status_of(exc)
            if outcome != "unauthorized":  # as on HTTP: refused before the request is read, not counted
                label = holder.get("label", UNKNOWN_MODEL)
                if outcome == "not_found" or (outcome == "overloaded" and not self._dataplane.knows(label)):
                    label = UNKNOWN_MODEL  # never let clients mint label values
                self._metrics.requests.labels(label, outcome).inc()
                if outcome == "error":
                    self._metrics.failures.labels(label, type(exc).__name__).inc()
            self._abort(context, exc, "ModelInfer failed")
        finally:
            if ticket is not None:
                ticket.release()
        label = holder["label"]
        self._metrics.requests.labels(label, "ok").inc()
        self._metrics.latency.labels(label).observe(time.perf_counter() - started)
        return body

    def _infer(self, data: bytes, holder: dict[str, str]) -> bytes:
        """On the handler thread, in an inference slot: parse, run and serialize one ModelInfer request."""
        try:
            message = messages.ModelInferRequest.FromString(data)
        except Exception as exc:  # protobuf's DecodeError; the message says where
            raise BadRequestError(f"the ModelInfer request is not a valid protobuf message: {exc}") from None
        holder["label"] = message.model_name
        if not message.model_name:
            raise BadRequestError("the ModelInfer request names no model (model_name is empty)")
        request = parse_infer_request(message)
        name, version, results = self._dataplane.infer_parsed(
            message.model_name, message.model_version or None, request
        )
        return encode_infer_response(name, version, request, results)

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if self._token is None:
            return
        value = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        given = value.encode() if isinstance(value, str) else value
        check_bearer(given, self._token, "metadata 'authorization: Bearer <token>'")

    def _abort(self, context: grpc.ServicerContext, exc: Exception, what: str) -> None:
        code, _ = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("gRPC %s", what, exc_info=exc)
            message = f"internal error: {type(exc).__name__}: {exc}"
        else:
            log.debug("gRPC %s -> %s: %s", what, code.name, exc)
            message = str(exc)
        if isinstance(exc, ServerOverloadedError):
            context.set_trailing_metadata((("retry-after", str(RETRY_AFTER_S)),))
        context.abort(code, message)


def _unimplemented(name: str) -> Callable[[Any, grpc.ServicerContext], None]:
    def handle(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by this server")

    return handle
