"""The link's one worker thread: takes jobs from the queue and runs each to a result.

An install: expiry and target checks, the index and chunks (``fetch.py``), the whole-file hash, then
``DeviceAgent.install`` — the same state machine as the CLI, on this thread, so the API keeps serving.
A rollback: ``DeviceAgent.rollback``. Every job ends with the device state published and then its
``result`` event, and leaves the command book's pending list; only a stopping link leaves it pending
(it resumes at the next start). A bug in one job ends that job (``internal``), never the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edgepack.agent.link.book import CommandBook
from edgepack.agent.link.events import EventSink
from edgepack.agent.link.fetch import Fetcher
from edgepack.agent.link.jobs import Job, JobQueue, JobState, Preempted, Stopped
from edgepack.agent.receiver import ChunkReceiver
from edgepack.agent.service import DeviceAgent
from edgepack.errors import EdgepackError, InstallError, TargetMismatchError
from edgepack.protocol import (
    AcceptedEvent,
    InstallCommand,
    ProgressEvent,
    ResultEvent,
    TransferCounters,
    error_code,
)

log = logging.getLogger(__name__)

INSTALL_PHASES = ("verify", "stage", "switch", "commit")


class Worker:
    """Runs the jobs of :class:`JobQueue` one at a time on its own thread."""

    def __init__(
        self,
        agent: DeviceAgent,
        book: CommandBook,
        jobs: JobQueue,
        fetcher: Fetcher,
        receiver: ChunkReceiver,
        events: EventSink,
        publish_state: Callable[[], None],
        name: str,
    ) -> None:
        self.agent = agent
        self.book = book
        self.jobs = jobs
        self.fetcher = fetcher
        self.receiver = receiver
        self.events = events
        self.publish_state = publish_state
        self.name = name
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.stopping.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self.stopping.set()
        self.jobs.close()
        job = self.jobs.current
        if job is not None and job.transfer is not None:
            job.transfer.poke()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the link's worker is still busy (an install in progress); not waiting for it")

    def end_unrun(self, job: Job, exc: EdgepackError) -> None:
        """End a job that will not run (expired while pending): result ``failed``, no ``accepted``."""
        log.warning("command %s (%s %s) is not run: %s", job.id, job.command.action, job.command.model, exc)
        self.finish(job, self.failure(job, exc))

    # --- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.book.reported(self.events.acknowledged())
            job = self.jobs.take(1.0)
            if job is None:
                continue
            try:
                self._run(job)
            except Stopped:
                log.info("stopping with command %s pending; it resumes at the next start", job.id)
                return
            except Exception as exc:  # a bug must not stop the worker for good: end the job, report, log
                log.exception("command %s failed unexpectedly", job.id)
                self.finish(job, self.failure(job, exc))
            finally:
                self.jobs.done(job)

    def _run(self, job: Job) -> None:
        command = job.command
        job.begin(self.stopping)
        try:
            job.set_state(JobState.CHECKING)
        except Preempted as exc:
            self.finish(job, self._superseded(job, exc))
            return
        except EdgepackError as exc:  # expired while queued: not run
            self.end_unrun(job, exc)
            return
        self.events.emit(
            AcceptedEvent(
                **self.events.base(command.id), action=command.action, model=command.model, resumed=job.resumed
            )
        )
        counters = None
        try:
            if isinstance(command, InstallCommand):
                outcome, version, timings, counters = self._install(job, command)
            else:
                job.set_state(JobState.ROLLBACK)
                result = self.agent.rollback(command.model)
                outcome, version, timings = "committed", result.version, result.timings
        except Preempted as exc:
            self.finish(job, self._superseded(job, exc))
            return
        except Stopped:
            raise
        except (EdgepackError, OSError) as exc:
            log.warning("command %s (%s %s) failed: %s", command.id, command.action, command.model, exc)
            self.finish(job, self.failure(job, exc))
            return
        self.finish(
            job,
            ResultEvent(
                **self.events.base(command.id),
                outcome=outcome,  # type: ignore[arg-type]
                model=command.model,
                version=version,
                timings=timings,
                transfer=counters,
            ),
        )

    def _install(self, job: Job, command: InstallCommand) -> tuple[str, str, dict[str, float], TransferCounters | None]:
        state = self.agent.store.load_state()
        if state.model(command.model).active == command.bundle:
            return "committed", command.version, {}, None
        targets = self.agent.config.targets
        if targets and command.target not in targets:
            raise TargetMismatchError(
                f"bundle {command.model} {command.version} is built for target {command.target!r}; this device "
                f"accepts {', '.join(sorted(targets))} — not downloaded"
            )
        index = self.receiver.saved_index(command)
        if index is None:
            self.receiver.check_space(command.size, command.bundle)
            job.set_state(JobState.INDEX)
            index = self.fetcher.fetch_index(job, command)
        transfer = job.transfer = self.receiver.open(index)
        started = time.monotonic()
        try:
            self.fetcher.fetch_chunks(job, transfer)
            path = transfer.assemble()
        finally:
            transfer.close()
        download_s = round(time.monotonic() - started, 4)
        self.events.emit(
            ProgressEvent(
                **self.events.base(command.id),
                phase="downloaded",
                bundle=command.bundle,
                held_bytes=index.size,
                total_bytes=index.size,
            )
        )
        try:
            job.set_state(JobState.INSTALL)  # the last point a newer command, the expiry or the deadline can stop it
            result = self.agent.install(path)
        finally:
            path.unlink(missing_ok=True)
        return "committed", result.version, {"download": download_s, **result.timings}, transfer.counters.to_message()

    # --- results ---------------------------------------------------------------------------------

    def _superseded(self, job: Job, exc: Preempted) -> ResultEvent:
        log.info("command %s (%s %s) %s: %s", job.id, job.command.action, job.command.model, exc.code, exc.reason)
        return ResultEvent(
            **self.events.base(job.id),
            outcome="superseded",
            model=job.command.model,
            version=getattr(job.command, "version", None),
            code=exc.code,
            reason=exc.reason,
            transfer=job.transfer.counters.to_message() if job.transfer else None,
        )

    def failure(self, job: Job, exc: BaseException) -> ResultEvent:
        """The result of a job that raised: ``rolled_back`` when the install state machine refused the
        bundle (the live model never changed), ``failed`` when it ended before."""
        command = job.command
        rolled_back = isinstance(exc, InstallError) and isinstance(command, InstallCommand)
        return ResultEvent(
            **self.events.base(command.id),
            outcome="rolled_back" if rolled_back else "failed",
            model=command.model,
            version=getattr(command, "version", None),
            code=error_code(exc),
            reason=str(exc) or type(exc).__name__,
            transfer=job.transfer.counters.to_message() if job.transfer else None,
        )

    def finish(self, job: Job, event: ResultEvent) -> None:
        job.state = JobState(event.outcome)
        self.book.finish(job.id, event.outcome, result=event.model_dump(mode="json", exclude_none=True))
        if isinstance(job.command, InstallCommand) and not any(
            isinstance(p.command, InstallCommand) and p.command.bundle == job.command.bundle
            for p in self.book.pending()
        ):
            self.receiver.discard(job.command.bundle)
        self.jobs.done(job)
        self.publish_state()  # before the result, so whoever reads the result finds the new state
        self.events.emit(event)  # the loop records the broker's ack of it (book.reported) within a second

    def on_install_state(self, state: str) -> None:
        """The installer's state hook: progress events for verify/stage/switch/commit."""
        job = self.jobs.current
        if job is not None and state in INSTALL_PHASES:
            self.events.emit(
                ProgressEvent(**self.events.base(job.id), phase=state, bundle=getattr(job.command, "bundle", None))
            )
