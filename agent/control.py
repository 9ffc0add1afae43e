"""The daemon's control socket: ``edgepack agent install|rollback|status`` run *inside* the daemon.

Only one process may use a state directory (``agent/store_lock.py``). While ``edgepack agent run`` holds
it, the CLI hands its request to the daemon over a local Unix-domain socket, and the daemon runs it
through its own :class:`~edgepack.agent.install.Installer`: one process writes the store, numbers the
journals and owns the bundle directories it serves from.

Where: ``STATE/control/agent.sock``; the path is also written into the lock note, which is how clients
find it (a state directory whose path is too long for a socket address gets a private directory under
``$XDG_RUNTIME_DIR`` or the temp dir instead). Who: the directory is created 0700 and the socket is
chmodded 0600 before anyone can reach it (nobody else can traverse the directory), so there is no
moment with wider permissions; and every connection's peer credentials (``SO_PEERCRED``) must be the
daemon's own uid or root.

Protocol (JSON lines; one request per line, one reply line each; a connection may carry several)::

    {"op": "status"}                              -> {"ok": true, "result": {...describe_store..., "daemon": {...}}}
    {"op": "install", "path": "/abs/digits.epk"}  -> {"ok": true, "result": {"name", "version", "outcome", ...}}
    {"op": "rollback", "name": "digits"}          -> {"ok": true, "result": {...}}
    anything else, or a failure                   -> {"ok": false, "error": "what went wrong", "kind": "InstallError"}

A malformed request gets an error reply and never reaches the installer; nothing a client sends takes
the daemon down. Built on the standard library's ``socketserver`` (a thread per connection).

Usage::

    server = ControlServer(agent).start()       # the daemon, after boot
    reply = ask_daemon(state_dir, StatusRequest())   # the CLI: None when no daemon answers
    server.stop()
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import socketserver
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edgepack import errors
from edgepack.agent.store_lock import read_holder
from edgepack.errors import ControlSocketError, EdgepackError, InstallError

if TYPE_CHECKING:
    from edgepack.agent.service import DeviceAgent

log = logging.getLogger(__name__)

SOCKET_DIR = "control"
SOCKET_NAME = "agent.sock"
MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = 16 << 20
IDLE_TIMEOUT_S = 30.0  # a connection that sends nothing for this long is closed
CONNECT_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = {"status": 30.0, "install": 3600.0, "rollback": 3600.0}
_MAX_SUN_PATH = 107  # sockaddr_un.sun_path is 108 bytes with the terminating NUL


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StatusRequest(_Request):
    op: Literal["status"] = "status"


class InstallRequest(_Request):
    op: Literal["install"] = "install"
    path: str = Field(min_length=1, max_length=4096)


class RollbackRequest(_Request):
    op: Literal["rollback"] = "rollback"
    name: str = Field(min_length=1, max_length=256)


Request = Annotated[Union[StatusRequest, InstallRequest, RollbackRequest], Field(discriminator="op")]
_REQUEST = TypeAdapter(Request)


def _error(message: str, kind: str = "ControlSocketError") -> dict[str, Any]:
    return {"ok": False, "error": message, "kind": kind}


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, default=str).encode() + b"\n"


# --- server (the daemon) -------------------------------------------------------------------------


class ControlServer:
    """Serves the control socket of a running :class:`DeviceAgent` on a background thread."""

    def __init__(self, agent: DeviceAgent, *, status_extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.agent = agent
        self.status_extra = status_extra
        self._server: _UnixServer | None = None
        self._thread: threading.Thread | None = None
        self._directory: Path | None = None

    @property
    def path(self) -> Path:
        if self._server is None:
            raise RuntimeError("the control socket is not started")
        return Path(self._server.server_address)  # type: ignore[arg-type]

    def start(self) -> ControlServer:
        state_dir = self.agent.store.root.resolve()
        directory = state_dir / SOCKET_DIR
        if len(str(directory / SOCKET_NAME)) <= _MAX_SUN_PATH:
            _fresh_private_dir(directory)  # we hold the store lock: whatever is there is a dead daemon's
        else:
            runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
            directory = Path(tempfile.mkdtemp(prefix="edgepack-control-", dir=runtime))  # 0700
            log.info("state directory path too long for a socket address; control socket in %s", directory)
        path = directory / SOCKET_NAME
        server = _UnixServer(str(path), _Handler)
        os.chmod(path, 0o600)  # before this nobody else can reach it: the directory is 0700
        server.dispatcher = self.dispatch
        self._server, self._directory = server, directory
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="edgepack-control", daemon=True
        )
        self._thread.start()
        self.agent.lock.update(control_socket=str(path))
        log.info("control socket on %s", path)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        self.agent.lock.update(control_socket=None)
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)

    # --- requests --------------------------------------------------------------------------------

    def dispatch(self, line: bytes) -> dict[str, Any]:
        """One request line to one reply; never raises."""
        try:
            request = _REQUEST.validate_json(line)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())
            return _error(
                f"malformed control request ({problems}); send one JSON object per line, "
                'e.g. {"op": "status"}, {"op": "install", "path": "/abs/x.epk"} or {"op": "rollback", "name": "NAME"}'
            )
        try:
            return {"ok": True, "result": self._run(request)}
        except EdgepackError as exc:
            return _error(str(exc), type(exc).__name__)
        except Exception as exc:  # a bug must not take the daemon down: logged with its traceback, reported
            log.exception("control request %s failed", request.op)
            return _error(
                f"the daemon failed on {request.op}: {type(exc).__name__}: {exc} (see its log)", "EdgepackError"
            )

    def _run(self, request: StatusRequest | InstallRequest | RollbackRequest) -> dict[str, Any]:
        if isinstance(request, InstallRequest):
            path = Path(request.path)
            if not path.is_absolute():
                raise InstallError(f"install path {request.path!r} must be absolute (the daemon has its own cwd)")
            if not path.is_file() or not os.access(path, os.R_OK):
                raise InstallError(
                    f"the daemon (PID {os.getpid()}, uid {os.geteuid()}) cannot read {path}; put the bundle where "
                    "the daemon's user can read it (a service with PrivateTmp= does not see the caller's /tmp)"
                )
            log.info("install of %s requested on the control socket", path)
            return {**dataclasses.asdict(self.agent.install(path)), "daemon": self._daemon()}
        if isinstance(request, RollbackRequest):
            log.info("rollback of %s requested on the control socket", request.name)
            return {**dataclasses.asdict(self.agent.rollback(request.name)), "daemon": self._daemon()}
        status = self.agent.status()
        status["daemon"] = {**self._daemon(), **(self.status_extra() if self.status_extra else {})}
        return status

    def _daemon(self) -> dict[str, Any]:
        holder = self.agent.lock.holder
        return {
            "pid": holder.pid,
            "command": holder.command,
            "since": holder.since,
            "control_socket": holder.control_socket,
            "trust_dir": str(self.agent.config.trust_dir),
            "targets": self.agent.config.targets,
        }


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    dispatcher: Callable[[bytes], dict[str, Any]]

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("control connection ended with an error", exc_info=True)


class _Handler(socketserver.StreamRequestHandler):
    timeout = IDLE_TIMEOUT_S
    server: _UnixServer

    def handle(self) -> None:
        refusal = _peer_refusal(self.connection)
        if refusal is not None:
            log.warning("control socket: %s", refusal)
            self._reply(_error(refusal, "ControlSocketError"))
            return
        while True:
            try:
                line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
            except (TimeoutError, OSError):
                return
            if not line:
                return
            if len(line) > MAX_REQUEST_BYTES:
                self._reply(_error(f"control request longer than {MAX_REQUEST_BYTES} bytes; connection closed"))
                return
            if not line.strip():
                continue
            if not self._reply(self.server.dispatcher(line)):
                return

    def _reply(self, reply: dict[str, Any]) -> bool:
        try:
            self.wfile.write(_encode(reply))
            self.wfile.flush()
        except OSError:
            return False  # the client went away; the work it asked for is done and journaled anyway
        return True


def _peer_refusal(connection: socket.socket) -> str | None:
    """Why this peer may not use the socket (None when it may): only the daemon's own uid, or root."""
    creds = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    if uid in (os.geteuid(), 0):
        return None
    return f"refused PID {pid}: uid {uid} is neither the daemon's user (uid {os.geteuid()}) nor root"


def _fresh_private_dir(directory: Path) -> None:
    if directory.is_symlink() or directory.is_file():
        directory.unlink()
    elif directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o700)  # mkdir's mode is narrowed by the umask, never widened; be exact anyway


# --- client (the CLI) ----------------------------------------------------------------------------


def ask_daemon(state_dir: Path, request: StatusRequest | InstallRequest | RollbackRequest) -> dict[str, Any] | None:
    """Send ``request`` to the daemon holding ``state_dir``; its result, or None when no daemon answers.

    None means nothing listens on the socket the lock note names (no daemon, or one not serving it yet):
    the caller then tries to take the store itself. A daemon that accepts the request and fails it raises
    the error it reported; one that breaks off raises :class:`ControlSocketError`.
    """
    holder = read_holder(state_dir)
    if holder is None or holder.control_socket is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(holder.control_socket)
        except OSError as exc:  # ENOENT, ECONNREFUSED (a dead daemon's socket), EACCES, a timeout
            log.debug("no daemon on %s: %s", holder.control_socket, exc)
            return None
        sock.settimeout(REPLY_TIMEOUT_S[request.op])
        try:
            sock.sendall(request.model_dump_json().encode() + b"\n")
            with sock.makefile("rb") as reader:
                line = reader.readline(MAX_REPLY_BYTES)
        except OSError as exc:
            raise ControlSocketError(
                f"the daemon {holder.describe()} took the {request.op} request on {holder.control_socket} but did "
                f"not answer ({exc}); see its log (an install it began ends in its journal either way)"
            ) from exc
    finally:
        sock.close()
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise ControlSocketError(
            f"the daemon {holder.describe()} closed {holder.control_socket} without a valid answer to {request.op}; "
            "see its log"
        )
    if not reply.get("ok"):
        raise _error_class(reply.get("kind"))(str(reply.get("error") or "the daemon refused the request"))
    result = reply.get("result")
    return result if isinstance(result, dict) else {}


def _error_class(kind: Any) -> type[EdgepackError]:
    cls = getattr(errors, kind, None) if isinstance(kind, str) else None
    if isinstance(cls, type) and issubclass(cls, EdgepackError) and cls is not errors.StoreLockedError:
        return cls
    return EdgepackError
