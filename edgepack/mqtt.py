"""A thin wrapper around paho-mqtt 2.x that the agent and the operator share.

What it adds to paho, and why (everything else is paho's own: reconnect with backoff, QoS 1 resend after
a reconnect, the last will, TLS, MQTT 5 properties):

- **URLs.** ``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` with a CA, client certificate and key.
- **Protocol negotiation.** ``protocol="auto"`` first sends a bare MQTT 5 CONNECT (no properties, no
  will) and uses MQTT 5 if the broker accepts it, 3.1.1 if it answers "unsupported protocol version" or
  does not answer at all. The probe is bare because 3.1.1-only brokers that parse the whole CONNECT
  before looking at its level (amqtt) hang on v5 properties instead of refusing. paho fixes the protocol
  when a client is made, so the real client is made once the answer is known; it stays for the process.
- **Subscriptions that survive reconnects.** :meth:`MqttClient.subscribe` records what the caller wants and
  (re)subscribes on every connect, each topic once per connection. On 3.1.1 a repeated SUBSCRIBE makes the
  broker send retained messages again; subscribing once per connection is what keeps a resumed transfer
  from receiving a chunk twice. On MQTT 5 subscriptions use *retain handling 1* (retained messages only
  for a new subscription), so a resumed session does not bring them again either.
- **MQTT 5 where there is MQTT 5.** Session expiry, receive maximum and maximum packet size on connect
  (clean start on the first connect of a process only, paho's ``MQTT_CLEAN_START_FIRST_ONLY``), message
  expiry and content type on publish, a will delay; on 3.1.1 those are left out. With a maximum packet
  size the broker drops a larger message for us instead of sending it (MQTT 5 §3.1.2.11.4), so an oversized
  payload never reaches the callbacks and the connection stays up. Reason codes of refused connections and subscriptions are logged.

Callbacks run on paho's network thread; paho's ``suppress_exceptions`` keeps a failing callback from killing
that thread (the agent's link also reports per-message errors itself).

Usage::

    client = MqttClient(MqttOptions(url="mqtt://127.0.0.1:1883", client_id="op-1"), on_message=handle)
    client.connect(timeout=10)                    # or start() to connect in the background, forever
    client.subscribe(["edgepack/devices/+/events"])
    client.publish("edgepack/devices/cam-1/cmd", payload, retain=True, expiry_s=3600).wait_for_publish()
    client.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgepack.errors import BrokerConnectionError, ConfigError

log = logging.getLogger(__name__)

PROTOCOLS = ("auto", "3.1.1", "5")
SCHEMES = {"mqtt": (1883, False), "mqtts": (8883, True)}
SUBSCRIBE_BATCH = 100
_UNSUPPORTED_PROTOCOL = "Unsupported protocol version"


class _QuietClosedSocket(logging.Filter):
    """paho logs an ERROR when its loop runs once more after a clean disconnect with messages still queued
    ("Client is not connected"); that is expected at :meth:`MqttClient.stop`, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_paho_log = logging.getLogger(f"{__name__}.paho")
_paho_log.addFilter(_QuietClosedSocket())


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ConfigError(f"broker URL {url!r} must look like mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        default_port, tls = SCHEMES[parts.scheme]
        try:
            port = parts.port or default_port
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r} has a bad port: {exc}") from exc
        return cls(parts.hostname, port, tls)


@dataclass
class MqttOptions:
    """How to reach the broker; :meth:`from_settings` reads the agent's ``[broker]`` section."""

    url: str
    client_id: str
    protocol: str = "auto"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    session_expiry_s: int = 0  # MQTT 5: how long the broker keeps our session after a disconnect
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30
    max_inflight: int = 20
    receive_maximum: int | None = None  # MQTT 5: QoS 1 messages the broker may have in flight to us
    max_packet_size: int | None = None  # MQTT 5: the broker drops (never sends us) larger packets

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"MQTT protocol {self.protocol!r} must be one of {', '.join(PROTOCOLS)}")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("a client certificate needs its key and a key its certificate (--cert with --key)")
        BrokerAddress.parse(self.url)

    @classmethod
    def from_settings(cls, settings: Any, client_id: str, **overrides: Any) -> MqttOptions:
        """From an object with the fields of ``edgepack.agent.config.BrokerSettings``."""
        if not settings.url:
            raise ConfigError("no broker URL (--broker mqtt://HOST:PORT or [broker] url in the config)")
        fields = {
            "url": settings.url,
            "client_id": client_id,
            "protocol": settings.protocol,
            "ca": settings.ca,
            "cert": settings.cert,
            "key": settings.key,
            "username": settings.username,
            "password": settings.password,
            "keepalive": settings.keepalive,
        }
        fields.update(overrides)
        return cls(**fields)


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for us when the connection is lost without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True
    delay_s: int = 0  # MQTT 5 only: a reconnect within this delay publishes nothing


@dataclass(frozen=True)
class Received:
    """A message as the callbacks get it. ``retained``: sent because of a (new) subscription, not live."""

    topic: str
    payload: bytes
    retained: bool
    qos: int


MessageHandler = Callable[[Received], None]
ConnectHandler = Callable[[bool], None]
DisconnectHandler = Callable[[str], None]


class MqttClient:
    """One MQTT connection that reconnects by itself; see the module docstring."""

    def __init__(
        self,
        options: MqttOptions,
        *,
        on_message: MessageHandler | None = None,
        on_connect: ConnectHandler | None = None,
        on_disconnect: DisconnectHandler | None = None,
        will: Will | None = None,
    ) -> None:
        self.options = options
        self.address = BrokerAddress.parse(options.url)
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._will = will
        self._lock = threading.RLock()
        self._wanted: dict[str, int] = {}  # topic filter -> QoS, kept across reconnects
        self._active: set[str] = set()  # subscribed on the current connection
        self._connected = threading.Event()
        self._stopping = False
        self._started = False
        self._protocol = "3.1.1" if options.protocol == "3.1.1" else "5"
        self._negotiated = options.protocol != "auto"
        self._woken = threading.Event()  # interrupts the negotiation's backoff at stop()
        self.session_present = False
        self.last_error: str | None = None
        self.connects = 0
        self._client: paho.Client | None = self._make_client() if self._negotiated else None

    # --- state -----------------------------------------------------------------------------------

    @property
    def protocol(self) -> str | None:
        """ "5" or "3.1.1" once known (before the first connection in ``auto`` mode: None)."""
        return self._protocol if self._negotiated else None

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and keep reconnecting (with backoff) until :meth:`stop`."""
        with self._lock:
            if self._started:
                return
            self._started = True
            if self._negotiated:
                self._start_client()
                return
        threading.Thread(target=self._negotiate, name=f"mqtt-negotiate-{self.options.client_id}", daemon=True).start()

    def connect(self, timeout: float = 10.0) -> None:
        """Start and wait for the first connection; raises BrokerConnectionError when none comes."""
        self.start()
        if not self._connected.wait(timeout):
            reason = self.last_error or "no answer"
            self.stop()
            raise BrokerConnectionError(
                f"cannot connect to the MQTT broker at {self.options.url} within {timeout:g} s ({reason}); "
                "is it running, and is --broker right?"
            )

    def stop(self) -> None:
        """Disconnect cleanly (the broker publishes no will) and stop the network thread."""
        with self._lock:
            self._stopping = True
            client = self._client
        self._woken.set()
        if client is None:
            return
        if self._connected.is_set():
            client.disconnect()
        client.loop_stop()
        self._connected.clear()

    def set_handlers(
        self,
        *,
        on_message: MessageHandler | None = None,
        on_connect: ConnectHandler | None = None,
        on_disconnect: DisconnectHandler | None = None,
    ) -> None:
        """Replace the callbacks (before :meth:`start`): for an owner made after its client, e.g. the agent's link."""
        with self._lock:
            self._on_message = on_message
            self._on_connect = on_connect
            self._on_disconnect = on_disconnect

    def set_will(self, will: Will) -> None:
        """Replace the last will; it takes effect with the next connection (MQTT sends it in CONNECT)."""
        with self._lock:
            self._will = will
            if self._client is not None:
                self._apply_will(self._client)

    # --- messages --------------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
        content_type: str | None = None,
    ) -> paho.MQTTMessageInfo:
        """Publish; paho queues QoS 1 messages while disconnected and sends them after reconnecting.

        Wait for the broker's acknowledgement with :meth:`wait_published`. A QoS 1 message published while
        disconnected is marked as queued (paho reports ``MQTT_ERR_NO_CONN`` although it sends it later).
        """
        with self._lock:
            client = self._client
            if client is None:
                raise BrokerConnectionError(f"not connected to {self.options.url} yet (still looking for the broker)")
            properties = None
            if self._protocol == "5" and (expiry_s or content_type):
                properties = Properties(PacketTypes.PUBLISH)
                if expiry_s:
                    properties.MessageExpiryInterval = int(expiry_s)
                if content_type:
                    properties.ContentType = content_type
                    properties.PayloadFormatIndicator = 1 if content_type == "application/json" else 0
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos > 0 and info.rc == paho.MQTT_ERR_NO_CONN:
            info.rc = paho.MQTT_ERR_SUCCESS  # queued: paho sends it after reconnecting
        return info

    def wait_published(self, infos: Iterable[paho.MQTTMessageInfo], timeout: float | None = None) -> None:
        """Wait until the broker acknowledged every message; BrokerConnectionError when it does not in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for info in infos:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            info.wait_for_publish(remaining)
            if not info.is_published():
                raise BrokerConnectionError(
                    f"the broker at {self.options.url} did not acknowledge a publish within {timeout:g} s "
                    f"({'connected' if self.is_connected else self.last_error or 'disconnected'})"
                )

    def subscribe(self, topics: Iterable[str], qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect; each topic once per connection."""
        with self._lock:
            new = []
            for topic in topics:
                self._wanted[topic] = qos
                if topic not in self._active:
                    new.append(topic)
            if self._connected.is_set() and new:
                self._send_subscribe(new)

    def unsubscribe(self, topics: Iterable[str]) -> None:
        with self._lock:
            gone = [t for t in topics if self._wanted.pop(t, None) is not None]
            active = [t for t in gone if t in self._active]
            self._active.difference_update(gone)
            if self._connected.is_set() and active and self._client is not None:
                self._client.unsubscribe(active)

    @property
    def subscriptions(self) -> list[str]:
        with self._lock:
            return sorted(self._wanted)

    # --- paho ------------------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        client = self._bare_client(self._protocol)
        client.reconnect_delay_set(self.options.reconnect_min_s, self.options.reconnect_max_s)
        client.max_inflight_messages_set(self.options.max_inflight)
        client.max_queued_messages_set(0)
        self._apply_will(client)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        client.on_connect_fail = self._handle_connect_fail
        client.on_publish = self._handle_publish
        return client

    def _bare_client(self, protocol: str) -> paho.Client:
        """A paho client with the address, TLS and credentials, and nothing else."""
        v5 = protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.options.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else True,
        )
        client.suppress_exceptions = True
        client.enable_logger(_paho_log)
        if self.address.tls:
            client.tls_set(
                ca_certs=str(self.options.ca) if self.options.ca else None,
                certfile=str(self.options.cert) if self.options.cert else None,
                keyfile=str(self.options.key) if self.options.key else None,
            )
        if self.options.username:
            client.username_pw_set(self.options.username, self.options.password)
        return client

    def _apply_will(self, client: paho.Client) -> None:
        if self._will is None:
            return
        properties = None
        if self._protocol == "5" and self._will.delay_s:
            properties = Properties(PacketTypes.WILLMESSAGE)
            properties.WillDelayInterval = self._will.delay_s
        client.will_set(self._will.topic, self._will.payload, self._will.qos, self._will.retain, properties)

    def _negotiate(self) -> None:
        """``auto``: probe until the broker answers, then start the real client with the protocol it speaks."""
        delay = float(self.options.reconnect_min_s)
        while not self._stopping:
            found = self._probe()
            if found is not None:
                with self._lock:
                    if self._stopping:
                        return
                    self._protocol, self._negotiated = found, True
                    self._client = self._make_client()
                    self._start_client()
                log.info("broker %s speaks MQTT %s", self.options.url, found)
                return
            self._woken.wait(delay)
            delay = min(delay * 2, float(self.options.reconnect_max_s))

    def _probe(self, timeout: float = 5.0) -> str | None:
        """Send a bare MQTT 5 CONNECT: "5" if accepted, "3.1.1" if refused for its version or unanswered,
        None when the broker cannot be reached."""
        answers: list[ReasonCode] = []
        probe = self._bare_client("5")
        probe.on_connect = lambda client, userdata, flags, reason, properties: answers.append(reason)
        try:
            probe.connect(self.address.host, self.address.port, self.options.keepalive)
        except (OSError, ValueError) as exc:
            self.last_error = f"cannot reach {self.address.host}:{self.address.port}: {exc}"
            log.debug("%s; retrying with backoff", self.last_error)
            return None
        deadline = time.monotonic() + timeout
        while not answers and time.monotonic() < deadline:
            if probe.loop(0.1) != paho.MQTT_ERR_SUCCESS:
                break  # the broker closed the connection without an answer
        if answers and not answers[0].is_failure:
            probe.disconnect()
            probe.loop(0.1)
        leftover = probe.socket()  # still open when the broker neither answered nor closed
        if leftover is not None:
            leftover.close()
        if not answers or str(answers[0]) == _UNSUPPORTED_PROTOCOL:
            return "3.1.1"
        if answers[0].is_failure:
            log.warning("the broker %s refused the MQTT 5 probe: %s", self.options.url, answers[0])
        return "5"

    def _start_client(self) -> None:
        assert self._client is not None
        properties = None
        options = self.options
        if self._protocol == "5" and (options.session_expiry_s or options.receive_maximum or options.max_packet_size):
            properties = Properties(PacketTypes.CONNECT)
            if options.session_expiry_s:
                properties.SessionExpiryInterval = options.session_expiry_s
            if options.receive_maximum:
                properties.ReceiveMaximum = options.receive_maximum
            if options.max_packet_size:
                properties.MaximumPacketSize = options.max_packet_size
        self._client.connect_async(self.address.host, self.address.port, self.options.keepalive, properties=properties)
        self._client.loop_start()

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        if reason.is_failure:
            self.last_error = f"the broker refused the connection: {reason}"
            log.warning("%s (%s)", self.last_error, self.options.url)
            return
        self.session_present = bool(flags.session_present)
        self.connects += 1
        with self._lock:
            if client is not self._client:
                return
            self._active.clear()
            self._connected.set()
            if self._wanted:
                self._send_subscribe(list(self._wanted))
        log.info(
            "connected to %s with MQTT %s (session %s)",
            self.options.url,
            self._protocol,
            "resumed" if self.session_present else "new",
        )
        if self._on_connect is not None:
            self._on_connect(self.session_present)

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        with self._lock:
            if client is not self._client:
                return
            was_connected = self._connected.is_set()
            self._connected.clear()
            self._active.clear()
        if was_connected:
            self.last_error = f"disconnected: {reason}"
            log.log(
                logging.INFO if self._stopping else logging.WARNING,
                "MQTT %s from %s",
                self.last_error,
                self.options.url,
            )
            if self._on_disconnect is not None:
                self._on_disconnect(str(reason))

    def _handle_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self.last_error = f"cannot reach {self.address.host}:{self.address.port}"
        log.debug("%s; retrying with backoff", self.last_error)

    def _handle_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if self._on_message is not None:
            self._on_message(Received(message.topic, bytes(message.payload), bool(message.retain), message.qos))

    def _handle_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any
    ) -> None:
        if reason.is_failure:
            log.error("the broker refused a publish (message %d): %s", mid, reason)

    def _handle_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any
    ) -> None:
        for reason in reasons:
            if reason.is_failure:
                log.error("the broker refused a subscription (message %d): %s", mid, reason)

    def _send_subscribe(self, topics: list[str]) -> None:
        """Caller holds the lock and is connected."""
        for start in range(0, len(topics), SUBSCRIBE_BATCH):
            batch = topics[start : start + SUBSCRIBE_BATCH]
            if self._protocol == "5":
                entries: list[tuple[str, Any]] = [
                    (
                        t,
                        SubscribeOptions(
                            qos=self._wanted.get(t, 1), retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
                        ),
                    )
                    for t in batch
                ]
            else:
                entries = [(t, self._wanted.get(t, 1)) for t in batch]
            assert self._client is not None
            self._client.subscribe(entries)
            self._active.update(batch)
