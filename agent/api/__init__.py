"""The agent's local inference API: KServe v2 / Open Inference Protocol over HTTP.

Standard clients (tritonclient, KServe clients) work unchanged, with JSON or Triton's binary tensor data
extension. The parts, each with one job (after MLServer's split):

- :mod:`.repository` — the protocols the agent's model repository implements (leases on served models);
- :mod:`.datatypes`, :mod:`.codec` — KServe datatypes and the request/response codecs (no HTTP);
- :mod:`.validation` — a request checked against a model's signature;
- :mod:`.dataplane` — what each endpoint does, over a repository (no HTTP);
- :mod:`.app` — the ASGI transport: routes, body cap, bearer token, thread pool, error statuses;
- :mod:`.metrics` — Prometheus metrics; :mod:`.server` — uvicorn, blocking or in a thread;
- :mod:`.grpc_server`, :mod:`.grpc_codec`, :mod:`.grpc_proto` — the same API over KServe v2 gRPC
  (``grpc_port``), on the same dataplane, load bound, metrics and token;
- :mod:`.batching` — dynamic batching of a model's requests.

Usage::

    from edgepack.agent.api import ApiMetrics, serve
    serve(repository, host="127.0.0.1", port=8000, token=None, metrics=ApiMetrics())
"""

from edgepack.agent.api.app import DEFAULT_MAX_BODY_BYTES, InferenceApp
from edgepack.agent.api.metrics import ApiMetrics
from edgepack.agent.api.repository import ModelRepository, ServedModel
from edgepack.agent.api.server import ServerHandle, serve, start_in_thread

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "ApiMetrics",
    "InferenceApp",
    "ModelRepository",
    "ServedModel",
    "ServerHandle",
    "serve",
    "start_in_thread",
]
