"""Run the local inference API under uvicorn (httptools, uvloop where installed).

``serve`` blocks (the agent's main use); ``start_in_thread`` runs the server in a background thread and
returns a handle with the bound port and ``stop()``, for tests and for embedding the API in a process that
does other work. Both bind 127.0.0.1 by default; port 0 picks a free port.

Listening beyond loopback without a token is refused (:func:`check_listen`: a ConfigError naming the
address and the two ways out, a token or ``insecure_listen``). ``unix_path`` adds a Unix-domain socket
listener (file mode ``unix_mode``, 0600 by default) served by the same app, next to the TCP one; local
clients can then reach the API with no network port at all.

Usage::

    handle = start_in_thread(repository, port=0, token="s3cret")
    client = tritonclient.http.InferenceServerClient(handle.url)
    ...
    handle.stop()
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from edgepack.agent.api.app import DEFAULT_MAX_BODY_BYTES, InferenceApp
from edgepack.agent.api.metrics import ApiMetrics
from edgepack.agent.api.repository import ModelRepository
from edgepack.errors import ConfigError

if TYPE_CHECKING:
    from edgepack.agent.api.grpc_server import GrpcServer

__all__ = ["DEFAULT_UNIX_MODE", "ServerHandle", "check_listen", "serve", "start_in_thread"]

log = logging.getLogger(__name__)

DEFAULT_UNIX_MODE = 0o600


@dataclass
class ServerHandle:
    """A server running in a background thread. ``url`` is ``host:port``, as tritonclient takes it."""

    host: str
    port: int
    app: InferenceApp
    _server: uvicorn.Server
    _thread: threading.Thread
    unix_path: Path | None = field(default=None)
    grpc: GrpcServer | None = field(default=None)  # the KServe v2 gRPC listener, when grpc_port is set

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish, and wait up to ``timeout`` seconds."""
        if self.grpc is not None:
            self.grpc.stop()
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the API server thread did not stop within %.1f s", timeout)
        if self.unix_path is not None:
            _unlink_socket(self.unix_path)


def serve(
    repository: ModelRepository,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    workers: int | None = None,
    metrics: ApiMetrics | None = None,
    insecure_listen: bool = False,
    unix_path: Path | None = None,
    unix_mode: int = DEFAULT_UNIX_MODE,
    max_concurrent_requests: int | None = None,
    max_queued_bytes: int | None = None,
    grpc_port: int | None = None,
) -> None:
    """Serve the API until the process is told to stop (SIGINT/SIGTERM); arguments as :func:`start_in_thread`."""
    server, sockets, app = _prepare(repository, host, port, locals())
    log.info("local inference API on %s", _describe(sockets))
    grpc = _start_grpc(app, host, grpc_port, token, max_body_bytes, sockets)
    try:
        server.run(sockets=sockets)
    finally:
        if grpc is not None:
            grpc.stop()
        if unix_path is not None:
            _unlink_socket(Path(unix_path))


def start_in_thread(
    repository: ModelRepository,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    workers: int | None = None,
    metrics: ApiMetrics | None = None,
    insecure_listen: bool = False,
    unix_path: Path | None = None,
    unix_mode: int = DEFAULT_UNIX_MODE,
    max_concurrent_requests: int | None = None,
    max_queued_bytes: int | None = None,
    grpc_port: int | None = None,
    startup_timeout: float = 10.0,
) -> ServerHandle:
    """Start the API in a daemon thread; returns once it accepts connections.

    ``insecure_listen``: allow a non-loopback ``host`` without a token. ``unix_path``/``unix_mode``: a
    Unix-domain socket listener besides TCP. ``max_concurrent_requests``/``max_queued_bytes``: the load
    bound (None: derived; see :mod:`~edgepack.agent.api.admission`). ``grpc_port``: also serve KServe v2
    gRPC on this port (0: a free one; None: no gRPC), same app, bound, metrics and token.
    """
    server, sockets, app = _prepare(repository, host, port, locals())
    grpc = _start_grpc(app, host, grpc_port, token, max_body_bytes, sockets)
    bound_port = sockets[0].getsockname()[1]
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": sockets}, name=f"edgepack-api-{bound_port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            if grpc is not None:
                grpc.stop()
            raise RuntimeError(f"the API server on {host}:{bound_port} did not start")
        time.sleep(0.01)
    unix = Path(unix_path) if unix_path is not None else None
    return ServerHandle(
        host=host, port=bound_port, app=app, _server=server, _thread=thread, unix_path=unix, grpc=grpc
    )


def _start_grpc(
    app: InferenceApp, host: str, port: int | None, token: str | None, max_body: int, sockets: list[socket.socket]
) -> GrpcServer | None:
    """The gRPC listener next to HTTP (``port`` None: none); on failure the HTTP sockets are closed."""
    if port is None:
        return None
    try:
        try:
            from edgepack.agent.api.grpc_server import GrpcServer  # grpcio only where gRPC is asked for
        except ImportError as exc:
            raise ConfigError(
                f"grpc_port is set but gRPC cannot be served here ({exc}); install it with: "
                "pip install 'edgepack[agent-grpc]', or leave grpc_port unset"
            ) from exc
        return GrpcServer(app, host, port, token=token, max_body_bytes=max_body).start()
    except BaseException:
        for sock in sockets:
            sock.close()
        app.close()
        raise


def check_listen(host: str, port: int, token: str | None, insecure_listen: bool) -> None:
    """Refuse (ConfigError) to listen beyond loopback without a token, unless ``insecure_listen``."""
    if _is_loopback(host) or token:
        return
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if insecure_listen:
        log.warning(
            "the local API listens on %s without a token (insecure_listen): anyone who reaches it may use it", address
        )
        return
    raise ConfigError(
        f"refusing to listen on {address} without a token: anyone who can reach that address could run the "
        'models and read the metrics. Either set a bearer token (--token, EDGEPACK_TOKEN, or token = "..." in '
        "agent.toml), or, where the network itself is trusted, pass --insecure-listen (insecure_listen = true "
        "in agent.toml). To keep the API on this machine only, listen on 127.0.0.1 (the default)."
    )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything, so it counts as beyond loopback
        return False


def _prepare(
    repository: ModelRepository, host: str, port: int, args: dict[str, Any]
) -> tuple[uvicorn.Server, list[socket.socket], InferenceApp]:
    check_listen(host, port, args["token"], args["insecure_listen"])
    unix_mode = int(args["unix_mode"])
    if args["unix_path"] is not None and unix_mode & 0o007 and not args["token"] and not args["insecure_listen"]:
        raise ConfigError(
            f"refusing to make the API socket {args['unix_path']} with mode {unix_mode:04o} without a token: "
            "every user of this machine could use it. Use mode 0600 or 0660 (listen_unix_mode), set a token, "
            "or pass --insecure-listen."
        )
    app = InferenceApp(
        repository,
        metrics=args["metrics"],
        token=args["token"],
        max_body_bytes=args["max_body_bytes"],
        workers=args["workers"],
        max_concurrent_requests=args["max_concurrent_requests"],
        max_queued_bytes=args["max_queued_bytes"],
    )
    sockets = [_bind(host, port)]
    if args["unix_path"] is not None:
        try:
            sockets.append(_bind_unix(Path(args["unix_path"]), unix_mode))
        except BaseException:
            sockets[0].close()
            raise
    config = uvicorn.Config(
        app,
        http="httptools",
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        lifespan="on",
        access_log=False,
        log_config=None,  # leave logging to the agent's own configuration
        server_header=False,
    )
    return uvicorn.Server(config), sockets, app


def _describe(sockets: list[socket.socket]) -> str:
    names = []
    for sock in sockets:
        name = sock.getsockname()
        names.append(f"unix:{name}" if sock.family == socket.AF_UNIX else f"{name[0]}:{name[1]}")
    return ", ".join(names)


def _bind_unix(path: Path, mode: int) -> socket.socket:
    """A listening Unix-domain socket at ``path`` with file mode ``mode``; a stale socket file (nobody
    listening) left by a killed server is replaced, anything else at ``path`` is refused."""
    if path.is_symlink() or path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"cannot listen on {path}: it exists and is not a socket; choose another listen_unix")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing the stale API socket %s", path)
            _unlink_socket(path)
        else:
            raise ConfigError(f"cannot listen on {path}: another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on the Unix socket {path}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def _unlink_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()


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
