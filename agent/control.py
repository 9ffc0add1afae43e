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
    {"op": "trust_update", "document": "{...}"}   -> {"ok": true, "result": {"version", "applied", ...}}
    anything else, or a failure                   -> {"ok": false, "error": "what went wrong", "kind": "InstallError"}

``install`` normally carries the open bundle file as a descriptor (``SCM_RIGHTS``, which the CLI sends):
the daemon copies what the caller opened into ``STATE/uploads/`` and installs from there, so a bundle
works from wherever the caller can read it although the daemon runs as another user with a private
``/tmp`` (the firmware images' unit has ``User=edgepack``, ``PrivateTmp=yes``). Without a descriptor the
daemon opens ``path`` itself, which must then be absolute.

A malformed request gets an error reply and never reaches the installer; nothing a client sends takes
the daemon down. Built on the standard library's ``socketserver`` (a thread per connection); lines are
read by hand (``_Lines``) only because descriptors arrive through ``recvmsg``.

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
import stat
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
UPLOAD_DIR = "uploads"  # STATE/uploads/: bundles handed over as a file descriptor, copied in for the install
MAX_FDS = 4
MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = 16 << 20
IDLE_TIMEOUT_S = 30.0  # a connection that sends nothing for this long is closed
CONNECT_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = {"status": 30.0, "install": 3600.0, "rollback": 3600.0, "trust_update": 30.0}
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


class TrustUpdateRequest(_Request):
    """A new trust root (or a chain of them) for the daemon's trust store (``agent/trust_update.py``)."""

    op: Literal["trust_update"] = "trust_update"
    document: str = Field(min_length=2, max_length=MAX_REQUEST_BYTES - 1024)


Request = Annotated[
    Union[StatusRequest, InstallRequest, RollbackRequest, TrustUpdateRequest], Field(discriminator="op")
]
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
        self._uploads: Path | None = None

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
        _fresh_private_dir(state_dir / UPLOAD_DIR)
        self._uploads = state_dir / UPLOAD_DIR
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
        for directory in (self._directory, self._uploads):
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

    # --- requests --------------------------------------------------------------------------------

    def dispatch(self, line: bytes, fds: list[int] | None = None) -> dict[str, Any]:
        """One request line (and the descriptors that came with it, closed here) to one reply; never raises."""
        try:
            return self._dispatch(line, fds or [])
        finally:
            for fd in fds or []:
                os.close(fd)

    def _dispatch(self, line: bytes, fds: list[int]) -> dict[str, Any]:
        try:
            request = _REQUEST.validate_json(line)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())
            return _error(
                f"malformed control request ({problems}); send one JSON object per line, "
                'e.g. {"op": "status"}, {"op": "install", "path": "/abs/x.epk"} or {"op": "rollback", "name": "NAME"}'
            )
        try:
            return {"ok": True, "result": self._run(request, fds)}
        except EdgepackError as exc:
            return _error(str(exc), type(exc).__name__)
        except Exception as exc:  # a bug must not take the daemon down: logged with its traceback, reported
            log.exception("control request %s failed", request.op)
            return _error(
                f"the daemon failed on {request.op}: {type(exc).__name__}: {exc} (see its log)", "EdgepackError"
            )

    def _run(self, request: StatusRequest | InstallRequest | RollbackRequest, fds: list[int]) -> dict[str, Any]:
        if isinstance(request, InstallRequest) and fds:
            return self._install_upload(request, fds[0])
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
        if isinstance(request, TrustUpdateRequest):
            from edgepack.agent.trust_update import apply_document

            log.info("trust update requested on the control socket")
            return {**apply_document(self.agent.trust, request.document.encode()), "daemon": self._daemon()}
        if isinstance(request, RollbackRequest):
            log.info("rollback of %s requested on the control socket", request.name)
            return {**dataclasses.asdict(self.agent.rollback(request.name)), "daemon": self._daemon()}
        status = self.agent.status()
        status["daemon"] = {**self._daemon(), **(self.status_extra() if self.status_extra else {})}
        return status

    def _install_upload(self, request: InstallRequest, fd: int) -> dict[str, Any]:
        """Install a bundle the client opened and passed as a descriptor: the daemon need not see its path
        (another user's file, a caller's private /tmp), and what is installed is what the client opened."""
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InstallError(f"{request.path} is not a regular file; give a bundle file (.epk)")
        if self._uploads is None:
            raise InstallError("the control socket is not started")
        name = Path(request.path).name
        name = name if name not in ("", ".", "..") else "bundle.epk"
        staging = Path(tempfile.mkdtemp(prefix="upload-", dir=self._uploads))
        try:
            copy = staging / name
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                with os.fdopen(fd, "rb", closefd=False) as source, open(copy, "wb") as target:
                    shutil.copyfileobj(source, target, 1 << 20)
            except OSError as exc:
                raise InstallError(
                    f"the daemon could not copy {request.path} into {self._uploads}: {exc.strerror or exc}"
                ) from exc
            log.info(
                "install of %s (%d bytes, handed over as a descriptor) asked on the control socket", name, info.st_size
            )
            return {**dataclasses.asdict(self.agent.install(copy)), "daemon": self._daemon()}
        finally:
            shutil.rmtree(staging, ignore_errors=True)

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
    dispatcher: Callable[[bytes, list[int]], dict[str, Any]]

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
        lines = _Lines(self.connection)
        try:
            while True:
                try:
                    line, fds = lines.next()
                except (TimeoutError, OSError):
                    return
                if len(line) > MAX_REQUEST_BYTES:
                    lines.close_fds(fds)
                    self._reply(_error(f"control request longer than {MAX_REQUEST_BYTES} bytes; connection closed"))
                    lines.drain()
                    return
                if not line.strip():
                    lines.close_fds(fds)
                    if lines.eof:
                        return
                    continue
                if not self._reply(self.server.dispatcher(line, fds)) or lines.eof:
                    return
        finally:
            lines.close_fds(lines.pending)

    def _reply(self, reply: dict[str, Any]) -> bool:
        try:
            self.wfile.write(_encode(reply))
            self.wfile.flush()
        except OSError:
            return False  # the client went away; the work it asked for is done and journaled anyway
        return True


class _Lines:
    """Request lines from a connection, each with the descriptors (SCM_RIGHTS) received up to its end.

    Hand-written instead of the handler's buffered ``rfile`` because descriptors ride on ``recvmsg``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.pending: list[int] = []
        self.eof = False

    def next(self) -> tuple[bytes, list[int]]:
        """The next line: b"" at the end, or more than MAX_REQUEST_BYTES of one that is too long."""
        while b"\n" not in self.buffer and len(self.buffer) <= MAX_REQUEST_BYTES and not self.eof:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, MAX_FDS)
            self.pending.extend(fds)
            self.eof = not data
            self.buffer += data
        line, newline, rest = self.buffer.partition(b"\n")
        if newline and len(line) < MAX_REQUEST_BYTES:
            self.buffer = rest
            line += newline
        else:
            line, self.buffer = self.buffer, b""
        self.eof = self.eof and not self.buffer
        fds, self.pending = self.pending, []
        return line, fds

    def drain(self) -> None:
        """Read (and drop) what the client still sends, briefly: closing a Unix socket with unread input
        resets the connection, and the client would lose the error reply."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(1.0)
            for _ in range(256):  # at most 16 MiB
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, MAX_FDS)
                self.close_fds(fds)
                if not data:
                    return
        except (TimeoutError, OSError):
            return

    @staticmethod
    def close_fds(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)


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
            _send(sock, request)
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


def _send(sock: socket.socket, request: StatusRequest | InstallRequest | RollbackRequest) -> None:
    """Send one request line; an install carries the bundle's open descriptor too (SCM_RIGHTS), so the
    daemon reads the file this caller can read, wherever it is (the daemon runs as another user, with a
    private /tmp)."""
    data = request.model_dump_json().encode() + b"\n"
    if not isinstance(request, InstallRequest):
        sock.sendall(data)
        return
    try:
        fd = os.open(request.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise InstallError(f"cannot open {request.path}: {exc.strerror}") from exc
    try:
        sent = socket.send_fds(sock, [data], [fd])
    finally:
        os.close(fd)  # the daemon holds its own copy of the descriptor now
    sock.sendall(data[sent:])


def _error_class(kind: Any) -> type[EdgepackError]:
    cls = getattr(errors, kind, None) if isinstance(kind, str) else None
    if isinstance(cls, type) and issubclass(cls, EdgepackError) and cls is not errors.StoreLockedError:
        return cls
    return EdgepackError
