"""systemd's service notification protocol (sd_notify) for the agent: READY, WATCHDOG, STATUS, STOPPING.

The firmware images run the agent as a ``Type=notify`` unit with ``WatchdogSec=`` (see
``docs/firmware.md``). systemd then waits for ``READY=1`` before it counts the service as started, and
kills and restarts it when ``WATCHDOG=1`` stops arriving within ``WatchdogSec``. The agent sends:

* ``READY=1`` (with a ``STATUS=`` line) once the local API accepts connections;
* ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` while every liveness check passes — the API answers
  ``/v2/health/live`` and the MQTT link's worker thread is running and its lock is free. A wedged agent
  stops pinging (and says which part is stuck in ``STATUS=``), so systemd restarts it;
* ``STOPPING=1`` on the way out.

The protocol is one datagram of ``KEY=VALUE`` lines sent to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace); without that variable every call is a
no-op, so the agent runs the same outside systemd. It is hand-written (forty lines of ``socket``) because
the libraries on PyPI do not fit a device image: ``sdnotify`` (last released 2017) swallows every socket
error silently and knows nothing of ``$WATCHDOG_USEC``/``$WATCHDOG_PID``, and ``systemd-python`` binds
libsystemd and builds from source, needing a C compiler and libsystemd's headers on the device.

Usage::

    notifier = Notifier.from_env()
    notifier.ready("serving 2 models")                    # READY=1 + STATUS=
    watchdog = Watchdog(notifier, {"api": lambda: True})  # pings at half WATCHDOG_USEC while checks pass
    watchdog.start()
    ...
    notifier.stopping()
    watchdog.stop()
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import urllib.request
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgepack.agent.api.server import ServerHandle
    from edgepack.agent.link import AgentLink

log = logging.getLogger(__name__)

Check = Callable[[], bool]
HEALTH_TIMEOUT_S = 5.0


class Notifier:
    """Sends notifications to systemd's socket; every method is a no-op when there is no socket."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address or None
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """From ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC`` (ignored when ``$WATCHDOG_PID`` names another process)."""
        env = os.environ if environ is None else environ
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC", "").strip()
        pid = env.get("WATCHDOG_PID", "").strip()
        if raw:
            if not raw.isdigit():
                log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", raw)
            elif pid and pid != str(os.getpid()):
                log.info(
                    "WATCHDOG_USEC is meant for process %s, not this one (%d); no watchdog pings", pid, os.getpid()
                )
            else:
                usec = int(raw)
        return cls(env.get("NOTIFY_SOCKET"), usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the watchdog timeout, as sd_watchdog_enabled(3) advises; None without one."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; False (and a warning) when the socket cannot take it."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(target)
                sock.sendall("\n".join(lines).encode())
        except OSError as exc:
            log.warning("cannot notify systemd through %s: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *self._status(status))

    def status(self, text: str) -> bool:
        return self.notify(*self._status(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *self._status(status))

    @staticmethod
    def _status(text: str | None) -> list[str]:
        return [f"STATUS={' '.join(text.split())}"] if text else []  # one line: a newline would end the field


class Watchdog:
    """A daemon thread that sends ``WATCHDOG=1`` every ``notifier.watchdog_interval`` while all checks pass.

    A check that returns False, raises or hangs stops the pings: systemd then restarts the agent after
    ``WatchdogSec``. Does nothing when the notifier has no socket or no watchdog interval.
    """

    def __init__(self, notifier: Notifier, checks: Mapping[str, Check], *, interval: float | None = None) -> None:
        self.notifier = notifier
        self.checks = dict(checks)
        self.interval = interval if interval is not None else notifier.watchdog_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wedged: list[str] = []

    def start(self) -> None:
        if not self.notifier.enabled or not self.interval:
            return
        log.info("systemd watchdog: pinging every %.1f s while %s answer", self.interval, ", ".join(self.checks))
        self._thread = threading.Thread(target=self._loop, name="edgepack-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def failing(self) -> list[str]:
        """The names of the checks that do not pass now."""
        failing = []
        for name, check in self.checks.items():
            try:
                ok = check()
            except Exception as exc:  # a check that raises is a failed check, reported, never fatal
                log.debug("liveness check %s raised %r", name, exc)
                ok = False
            if not ok:
                failing.append(name)
        return failing

    def _loop(self) -> None:
        assert self.interval is not None
        self.notifier.watchdog()  # the first ping at once: the timeout runs from the start of the service
        while not self._stop.wait(self.interval):
            failing = self.failing()
            if self._stop.is_set():
                return
            if failing:
                if failing != self.wedged:
                    log.error("liveness check failed: %s; no watchdog ping (systemd restarts a wedged agent)", failing)
                    self.notifier.status(f"wedged: {', '.join(failing)} not answering")
                self.wedged = failing
                continue
            if self.wedged:
                log.warning("liveness checks pass again (%s recovered)", ", ".join(self.wedged))
                self.wedged = []
            self.notifier.watchdog()


# --- what "alive" means for the agent ----------------------------------------------------------------


def api_alive(handle: ServerHandle, timeout: float = HEALTH_TIMEOUT_S) -> Check:
    """The API answers ``GET /v2/health/live`` (open without a token) within ``timeout`` seconds."""
    url = f"http://{handle.url}/v2/health/live"

    def check() -> bool:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # our own API, on loopback
            return response.status == 200 and bool(json.loads(response.read() or b"{}").get("live", True))

    return check


def link_alive(link: AgentLink, timeout: float = HEALTH_TIMEOUT_S) -> Check:
    """The link's worker thread runs and the link's state can be read (its lock is not held forever)."""

    def check() -> bool:
        worker = link._worker  # the link has no public liveness probe; its worker thread is the loop that matters
        if worker is None or not worker.is_alive():
            return False
        answered = threading.Event()
        threading.Thread(target=lambda: (link.status(), answered.set()), daemon=True).start()
        return answered.wait(timeout)

    return check


def notify_serving(
    handle: ServerHandle, link: AgentLink | None, status: str, notifier: Notifier | None = None
) -> Watchdog:
    """Tell systemd the agent serves (READY=1) and start the watchdog on the API (and link) checks; on the way
    out call ``watchdog.notifier.stopping()`` and ``watchdog.stop()``."""
    notifier = notifier or Notifier.from_env()
    checks = {"api": api_alive(handle)}
    if link is not None:
        checks["link"] = link_alive(link)
    if notifier.ready(status):
        log.info("told systemd the agent is ready (%s)", status)
    watchdog = Watchdog(notifier, checks)
    watchdog.start()
    return watchdog
