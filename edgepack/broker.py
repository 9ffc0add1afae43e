"""``edgepack broker``: an embedded MQTT broker for single-site use and for machines without mosquitto.

It is `amqtt <https://github.com/Yakifo/amqtt>`_, a pure-Python broker that installs with pip (the
``broker`` extra), so the demo runs on a machine without root. It speaks MQTT 3.1.1 only: edgepack's
clients in ``auto`` mode try MQTT 5, get "unsupported protocol version" and fall back (amqtt logs one
warning per such attempt). Retained messages and QoS 1 — all the protocol needs — work. It keeps
everything in memory; for a fleet, run mosquitto (or any MQTT 5 broker) with persistence instead.

Usage::

    broker = EmbeddedBroker(port=1883)
    broker.start()            # in a background thread with its own event loop
    ...                       # broker.url == "mqtt://127.0.0.1:1883"
    broker.stop()

or ``edgepack broker --port 1883`` in the foreground.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any

from edgepack.errors import BrokerConnectionError, ConfigError

log = logging.getLogger(__name__)


def _broker_class() -> Any:
    try:
        from amqtt.broker import Broker
    except ModuleNotFoundError as exc:
        raise ConfigError("the embedded broker needs amqtt: pip install 'edgepack[broker]' (or run mosquitto)") from exc
    return Broker


def broker_config(host: str, port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


class EmbeddedBroker:
    """amqtt on its own event loop in a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        broker_class = _broker_class()
        self._thread = threading.Thread(target=self._run, args=(broker_class,), name="edgepack-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise BrokerConnectionError(f"the embedded broker did not start on {self.host}:{self.port}: {self._error}")
        log.info("embedded MQTT broker on %s", self.url)

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        future.result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)

    def serve_forever(self) -> None:
        """Run in the foreground until SIGINT or SIGTERM."""
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: stop.set())
        self.start()
        try:
            while not stop.wait(0.5):
                if self._thread is None or not self._thread.is_alive():
                    raise BrokerConnectionError("the embedded broker stopped by itself; see the log above")
        finally:
            log.info("stopping the embedded broker")
            self.stop()

    def _run(self, broker_class: Any) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._broker = broker_class(broker_config(self.host, self.port), loop=loop)
            loop.run_until_complete(self._broker.start())
        except Exception as exc:  # amqtt raises its own errors and OSError; hand them to start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()
