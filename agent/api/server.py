"""Run the local inference API under uvicorn (httptools, uvloop where installed).

``serve`` blocks (the agent's main use); ``start_in_thread`` runs the server in a background thread and
returns a handle with the bound port and ``stop()``, for tests and for embedding the API in a process that
does other work. Both bind 127.0.0.1 by default; port 0 picks a free port.

Usage::

    handle = start_in_thread(repository, port=0, token="s3cret")
    client = tritonclient.http.InferenceServerClient(handle.url)
    ...
    handle.stop()
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from edgepack.agent.api.app import DEFAULT_MAX_BODY_BYTES, InferenceApp
from edgepack.agent.api.metrics import ApiMetrics
from edgepack.agent.api.repository import ModelRepository

__all__ = ["ServerHandle", "serve", "start_in_thread"]

log = logging.getLogger(__name__)


@dataclass
class ServerHandle:
    """A server running in a background thread. ``url`` is ``host:port``, as tritonclient takes it."""

    host: str
    port: int
    app: InferenceApp
    _server: uvicorn.Server
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish, and wait up to ``timeout`` seconds."""
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the API server thread did not stop within %.1f s", timeout)


def serve(
    repository: ModelRepository,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    workers: int | None = None,
    metrics: ApiMetrics | None = None,
) -> None:
    """Serve the API until the process is told to stop (SIGINT/SIGTERM)."""
    server, sock, _ = _prepare(repository, host, port, token, max_body_bytes, workers, metrics)
    log.info("local inference API on %s:%d", host, sock.getsockname()[1])
    server.run(sockets=[sock])


def start_in_thread(
    repository: ModelRepository,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    workers: int | None = None,
    metrics: ApiMetrics | None = None,
    startup_timeout: float = 10.0,
) -> ServerHandle:
    """Start the API in a daemon thread; returns once it accepts connections."""
    server, sock, app = _prepare(repository, host, port, token, max_body_bytes, workers, metrics)
    bound_port = sock.getsockname()[1]
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"edgepack-api-{bound_port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the API server on {host}:{bound_port} did not start")
        time.sleep(0.01)
    return ServerHandle(host=host, port=bound_port, app=app, _server=server, _thread=thread)


def _prepare(
    repository: ModelRepository,
    host: str,
    port: int,
    token: str | None,
    max_body_bytes: int,
    workers: int | None,
    metrics: ApiMetrics | None,
) -> tuple[uvicorn.Server, socket.socket, InferenceApp]:
    app = InferenceApp(repository, metrics=metrics, token=token, max_body_bytes=max_body_bytes, workers=workers)
    config = uvicorn.Config(
        app,
        http="httptools",
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        lifespan="on",
        access_log=False,
        log_config=None,  # leave logging to the agent's own configuration
        server_header=False,
    )
    return uvicorn.Server(config), _bind(host, port), app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose
    # proto says TCP, and a socket made with proto 0 hands that 0 to every connection it accepts. Left on,
    # Nagle held each response's body until the client's delayed ACK of its headers: 44 ms a request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock
