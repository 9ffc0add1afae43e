"""The link's MQTT callbacks (paho's network thread): classify each message and hand it to its owner.

Commands are checked here, in this order — JSON and schema, known action, recipient (this device, or the
group of the topic, which must be one of the device's), signatures (the trust store's ``command`` role),
then the replay rules of the command book — and anything refused becomes a ``rejected`` event naming the
reason. An accepted command is persisted, then queued; a newer one for the same model pre-empts the older
pending install (queued: ended at once; running: asked to stop, see ``jobs.py``). Index and chunk
messages go to the fetcher. A group's retained ``trust`` message (new trust root versions) goes to the
trust store's own rules (``agent/trust_update.py``); a refused one becomes a ``rejected`` event too.
Nothing here blocks or sleeps: the network thread must keep the connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from edgepack.agent.link.book import CommandBook
from edgepack.agent.link.events import EventSink
from edgepack.agent.link.fetch import Fetcher
from edgepack.agent.link.jobs import Job, JobQueue
from edgepack.errors import EdgepackError, WrongRecipientError
from edgepack.mqtt import Received
from edgepack.protocol import (
    ResultEvent,
    RollbackCommand,
    SignedCommand,
    TopicMatch,
    Topics,
    parse_command,
    parse_trust_update,
    verify_command,
)
from edgepack.trust import TrustStore

log = logging.getLogger(__name__)


class Dispatcher:
    """``on_message`` of the link's MQTT client."""

    def __init__(
        self,
        *,
        device: str,
        groups: list[str],
        topics: Topics,
        trust: TrustStore,
        book: CommandBook,
        jobs: JobQueue,
        fetcher: Fetcher,
        events: EventSink,
        new_job: Callable[[SignedCommand], Job],
        on_trust_applied: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.device = device
        self.groups = groups
        self.topics = topics
        self.trust = trust
        self.book = book
        self.jobs = jobs
        self.fetcher = fetcher
        self.events = events
        self.new_job = new_job
        self.on_trust_applied = on_trust_applied

    def on_message(self, message: Received) -> None:
        match = self.topics.parse(message.topic)
        if match is None:
            log.debug("ignoring a message on %s", message.topic)
            return
        try:
            if match.kind in ("device_cmd", "group_cmd"):
                self._on_command(match, message)
            elif match.kind == "group_trust":
                self._on_trust(match, message)
            elif match.kind == "index":
                self.fetcher.on_index(message.topic, message.payload)
            elif match.kind == "chunk":
                self.fetcher.on_chunk(match.key, message.topic, message.payload)
        except EdgepackError as exc:
            log.warning("rejected a message on %s: %s", message.topic, exc)
            self.events.reject(message.topic, exc)
        except Exception as exc:  # one bad message must not stop the link: report it, log it, go on
            log.exception("error handling a message on %s", message.topic)
            self.events.reject(message.topic, exc)

    def _on_command(self, match: TopicMatch, message: Received) -> None:
        if not message.payload:
            return  # a cleared retained command
        signed = parse_command(message.payload)
        command = signed.command
        try:
            self._check_recipient(match, signed)
            verify_command(signed, self.trust)
            if not self.book.check(signed, retained=message.retained):
                log.debug("command %s is already known; ignored", command.id)
                return
        except EdgepackError as exc:
            log.warning("refused command %s from %s: %s", command.id, message.topic, exc)
            self.events.reject(message.topic, exc, command.id)
            return
        superseded = self.book.accept(signed)
        log.info("accepted %s %s (command %s)", command.action, command.model, command.id)
        rollback = isinstance(command, RollbackCommand)
        code = "canceled" if rollback else "superseded"
        reason = f"{'canceled by rollback' if rollback else 'superseded by'} command {command.id}"
        for old in superseded:
            what = self.jobs.preempt(old.command.id, code, reason)
            if what == "removed":
                self.events.emit(
                    ResultEvent(
                        **self.events.base(old.command.id),
                        outcome="superseded",
                        model=old.command.model,
                        code=code,
                        reason=reason,
                    )
                )
            elif what == "installing":
                log.info("command %s is already installing; %s runs after it", old.command.id, command.id)
        self.jobs.put(self.new_job(signed))

    def _on_trust(self, match: TopicMatch, message: Received) -> None:
        if not message.payload or match.key not in self.groups:
            return  # a cleared retained message, or a group this device left
        applied = self.trust.update(parse_trust_update(message.payload).roots)
        if applied:
            log.info("trust root now version %d (from %s)", applied[-1], message.topic)
            if self.on_trust_applied is not None:
                self.on_trust_applied(applied)

    def _check_recipient(self, match: TopicMatch, signed: SignedCommand) -> None:
        to = signed.command.to
        if match.kind == "device_cmd":
            if to.device != self.device:
                raise WrongRecipientError(
                    f"command {signed.command.id} is for {to.describe()}, not device {self.device}"
                )
        elif to.group != match.key or match.key not in self.groups:
            raise WrongRecipientError(
                f"command {signed.command.id} is for {to.describe()}; device {self.device} is in "
                f"{', '.join(self.groups) or 'no group'}"
            )
