""":class:`AgentLink`: the parts of the link wired together, and its lifecycle (start, stop, status).

The parts, one job each: ``book.py`` (replay rules, persistence), ``jobs.py`` (job states, deadlines,
the queue), ``worker.py`` (runs jobs), ``dispatch.py`` (MQTT callbacks), ``fetch.py`` (index and
chunks, pacing, needs), ``events.py`` (events out, buffered offline), ``state.py`` (retained state, will).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from edgepack.agent.config import LinkSettings
from edgepack.agent.link.book import COMMANDS_FILE, CommandBook, expired, journal_times
from edgepack.agent.link.capture_upload import CaptureUploader
from edgepack.agent.link.dispatch import Dispatcher
from edgepack.agent.link.events import EventSink
from edgepack.agent.link.fetch import Fetcher
from edgepack.agent.link.jobs import Job, JobQueue
from edgepack.agent.link.state import StatePublisher
from edgepack.agent.link.worker import Worker
from edgepack.agent.receiver import ChunkReceiver, directory_size
from edgepack.agent.service import DeviceAgent
from edgepack.certs import common_name
from edgepack.errors import CommandExpiredError, ConfigError
from edgepack.mqtt import MqttClient, MqttOptions, Received
from edgepack.protocol import InstallCommand, ResultEvent, SignedCommand, Topics, groups_from_labels

log = logging.getLogger(__name__)

LinkOptions = LinkSettings  # the link's tuning is the [link] section of agent.toml, defined once


class AgentLink:
    """The MQTT side of one :class:`DeviceAgent`; :meth:`start` never waits for the broker.

    ``client``: an :class:`~edgepack.mqtt.MqttClient` to use instead of one made from ``[broker]`` (its
    handlers are replaced by the link's).
    """

    def __init__(
        self,
        agent: DeviceAgent,
        options: LinkSettings | None = None,
        *,
        client: MqttClient | None = None,
    ) -> None:
        self.agent = agent
        self.config = agent.config
        self.options = options or self.config.link
        if not self.config.device_id:
            raise ConfigError(
                "no device id, so the agent does not join the broker (two devices with one id knock each other "
                "off): set device_id in agent.toml or --device-id, or give the machine an /etc/machine-id"
            )
        self.device_id = self.config.device_id
        _warn_if_certificate_names_another_device(self.config.broker.cert, self.device_id)
        self.topics = Topics(self.config.broker.prefix)
        self.groups = groups_from_labels(self.config.labels)
        skipped = {f"{k}={v}" for k, v in self.config.labels.items()} - set(self.groups)
        if skipped:
            log.warning("labels %s cannot name a group in a topic; no group commands for them", sorted(skipped))
        quota = int(self.config.disk_quota_mb * (1 << 20)) if self.config.disk_quota_mb else None
        self.receiver = ChunkReceiver(
            agent.store.root / "incoming", quota_bytes=quota, usage=lambda: directory_size(agent.store.root)
        )
        self.book = CommandBook(agent.store.root / COMMANDS_FILE, journals=lambda: journal_times(agent.store))
        self.client = client or MqttClient(
            MqttOptions.from_settings(
                self.config.broker,
                self.device_id,
                session_expiry_s=self.options.session_expiry_s,
                reconnect_min_s=self.options.reconnect_min_s,
                reconnect_max_s=self.options.reconnect_max_s,
                receive_maximum=self.options.receive_maximum,
                max_packet_size=self.options.max_packet_size,
            )
        )
        self.client.set_handlers(
            on_message=self._on_message, on_connect=self._on_connect, on_disconnect=self._on_disconnect
        )
        self._connected_at = 0.0
        self.jobs = JobQueue()
        self.events = EventSink(
            self.client,
            self.topics.events(self.device_id),
            self.device_id,
            limit=self.config.broker.max_buffered_events,
            expiry_s=self.options.event_expiry_s,
        )
        self.fetcher = Fetcher(
            self.client, self.topics, self.receiver, self.events, self.options, lambda: self._connected_at
        )
        self.state = StatePublisher(
            agent,
            self.client,
            self.topics.state(self.device_id),
            device=self.device_id,
            groups=self.groups,
            will_delay_s=self.options.will_delay_s,
            transfer=lambda: self.fetcher.status(self.jobs.current),
            dropped_events=lambda: self.events.dropped,
            notices=lambda: list(self.book.notices),
        )
        self.worker = Worker(
            agent, self.book, self.jobs, self.fetcher, self.receiver, self.events, self.state.publish,
            name=f"edgepack-link-{self.device_id}",
        )  # fmt: skip
        self.dispatcher = Dispatcher(
            device=self.device_id,
            groups=self.groups,
            topics=self.topics,
            trust=agent.trust,
            book=self.book,
            jobs=self.jobs,
            fetcher=self.fetcher,
            events=self.events,
            new_job=self._new_job,
            on_trust_applied=lambda _versions: self.state.publish(),  # the state names the trust version
        )
        self._prev_state_hook = agent.installer.on_state
        self.capture: CaptureUploader | None = None  # upload of captured records (agent/link/capture_upload.py)
        if agent.field_data.buffer is not None:
            self.capture = CaptureUploader(
                agent.field_data.buffer, self.client, self.topics, self.device_id, agent.trust,
                chunk_size=self.config.capture.chunk_size, ack_timeout_s=self.config.capture.ack_timeout_s,
                configure=agent.field_data.configure,
            )  # fmt: skip
        agent.field_data.on_level_change = lambda _name, _level: self.state.publish()  # drift level in the state

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Resume pending commands (ending those that expired meanwhile), then connect in the background."""
        self.jobs.reopen()
        resumed = []
        for signed in self.book.pending():
            job = self._new_job(signed, resumed=True)
            if expired(signed):
                self.worker.end_unrun(
                    job,
                    CommandExpiredError(
                        f"command {job.id} ({job.command.action} {job.command.model}) expired at "
                        f"{job.command.expires_at.isoformat()} while pending across a restart; not run"  # type: ignore[union-attr]
                    ),
                )
            else:
                resumed.append(job)
        keep = {j.command.bundle for j in resumed if isinstance(j.command, InstallCommand)}
        for gone in self.receiver.discard_all_but(keep):
            log.info("removed partial transfer %s… that no pending command needs", gone[:12])
        self.client.set_will(self.state.will())
        self.client.subscribe(
            [self.topics.device_command(self.device_id)]
            + [self.topics.group_command(g) for g in self.groups]
            + [self.topics.group_trust(g) for g in self.groups]  # new trust roots (agent/trust_update.py)
        )
        self.jobs.extend(resumed)
        for result in self.book.unreported():  # killed before the broker took these: send them again
            log.info("sending again the result of command %s (%s)", result.get("command_id"), result.get("outcome"))
            self.events.emit(ResultEvent.model_validate(result))
        self.agent.installer.on_state = self._on_install_state
        if self.capture is not None:
            self.capture.start()
        self.worker.start()
        self.client.start()
        self.state.start_watch(self.options.state_interval_s)  # a health change while idle: the state again

    def stop(self, timeout: float = 10.0) -> None:
        """Stop working (a pending job resumes at the next start), mark the device offline, disconnect."""
        self.state.stop_watch()
        self.worker.stop(timeout)
        if self.capture is not None:
            self.capture.stop()
        self.agent.field_data.on_level_change = None
        self.state.publish_offline()
        self.client.stop()
        self.agent.installer.on_state = self._prev_state_hook

    @property
    def connected(self) -> bool:
        return self.client.is_connected

    @property
    def busy(self) -> bool:
        return self.jobs.busy

    @property
    def notices(self) -> list[str]:
        return list(self.book.notices)

    def status(self) -> dict[str, Any]:
        current = self.jobs.current
        return {
            "connected": self.connected,
            "protocol": self.client.protocol,
            "pending": self.jobs.queued_ids(),
            "current": current.id if current else None,
            "current_state": current.state.value if current else None,
            "buffered_events": len(self.events.buffered),
            "dropped_events": self.events.dropped,
            "counters": self.receiver.counters.as_dict(),
            "notices": self.notices,
        }

    # --- wiring ----------------------------------------------------------------------------------

    def _new_job(self, signed: SignedCommand, resumed: bool = False) -> Job:
        size = signed.command.size if isinstance(signed.command, InstallCommand) else None
        return Job(signed, deadline_s=self.options.deadline_s(size), resumed=resumed)

    def _on_connect(self, session_present: bool) -> None:
        self._connected_at = time.monotonic()
        self.state.publish()
        self.events.flush()

    def _on_disconnect(self, reason: str) -> None:
        log.info("broker connection lost (%s); serving on, events are buffered", reason)

    def _on_message(self, message: Received) -> None:
        if self.capture is not None and message.topic == self.capture.control_topic:
            self.capture.on_message(message)
            return
        self.dispatcher.on_message(message)

    def _on_install_state(self, state: str) -> None:
        self._prev_state_hook(state)
        self.worker.on_install_state(state)


def _warn_if_certificate_names_another_device(cert: Any, device_id: str) -> None:
    """A broker with the fleet's ACL (``docs/broker-acl.md``) takes the certificate's CN as the device's name:
    a ``device_id`` that differs has its state and events refused by the broker, with nothing said on the
    device. Say it here, once, at start."""
    if not cert:
        return
    try:
        cn = common_name(x509.load_pem_x509_certificate(Path(cert).read_bytes()))
    except (OSError, ValueError) as exc:
        log.warning("cannot read the client certificate %s: %s", cert, exc)
        return
    if cn and cn != device_id:
        log.warning(
            "device id %r differs from its certificate's CN %r: a broker that names clients by certificate "
            "(use_identity_as_username) refuses this device's state and events; set device_id = %r",
            device_id, cn, cn,
        )  # fmt: skip
