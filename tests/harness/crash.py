"""The crash harness: a real agent process on a real mosquitto, SIGKILLed at seeded random points.

One :class:`CrashHarness` owns one device: a state directory, an ``agent.toml``, and an operator
(:class:`edgepack.fleet.deploy.Deployer`) that publishes signed bundles and signed install and rollback
commands. :meth:`CrashHarness.cycle` is one kill:

1. start ``edgepack agent run`` (through ``tests/harness/agent_child.py``) with, for some cycles, a crash
   point armed (``tests/harness/crashpoints.py``: right after the journal records a step, just before or
   after ``state.json``, ``commands.json``, a journal or the staging directory is renamed into place, in the
   middle of extraction or of a transfer);
2. once its local API answers, check what it serves (:meth:`check_serving`); let any command it resumed
   finish (or let the crash point kill it there); once idle, check the store (:meth:`check_store`);
3. send one command — install the next version (a swap), a bundle whose self-test fails, an older version
   (anti-rollback), the active one again, or a rollback — and SIGKILL the agent: at the armed point, after a
   random delay, or when an event of a chosen phase reaches the operator.

Invariants, after every restart (the violations are collected, with the cycle's seed, never ignored):

- a model that verifies is served over the KServe v2 API: its answers are those of the version the store
  names active, and that bundle verifies on disk (signatures and payload hashes);
- a command acknowledged as committed (a ``result`` event with outcome ``committed`` reached the
  operator) is never lost: the active version is that one's, or that of a command sent after it;
- a bundle whose self-test fails is never active; ``highest_version`` never goes down;
- once idle: ``state.json`` names only bundles that exist and verify, ``bundles/`` holds nothing else,
  ``tmp/`` and ``incoming/`` are empty, no temporary file of an atomic write is left, every journal has an
  outcome, and the device did not wedge (it went idle within :data:`IDLE_TIMEOUT_S`).

Every choice comes from ``random.Random(f"{seed}:{cycle}")``: a violation names the seed and cycle, and
``EDGEPACK_CRASH_SEED`` reruns the same sequence.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent.store import bundle_hash
from edgepack.bundle import MANIFEST_NAME, SIGNATURES_NAME
from edgepack.errors import EdgepackError, InstallError
from edgepack.fleet.commands import install_command
from edgepack.fleet.deploy import Deployer
from edgepack.fsutil import file_digest
from edgepack.keys import SigningKey
from edgepack.manifest import parse_manifest
from edgepack.mqtt import MqttClient, MqttOptions, Received
from edgepack.protocol import (
    CommandTarget,
    InstallCommand,
    RollbackCommand,
    Topics,
    new_command_fields,
    parse_event,
    sign_command,
)
from edgepack.transfer import ChunkedBundle, chunk_bundle
from edgepack.trust import TrustStore, decode_signatures
from tests.harness.crashpoints import ENV_MARK, ENV_POINT
from tests.models import linear_bundle, linear_reference

REPO = Path(__file__).resolve().parents[2]
MODEL = "linear"
CHUNK = 8 * 1024
PAD = 48 * 1024  # payload padding: ~7 chunks a bundle, so kills land mid-transfer too
READY_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 90.0
X = np.random.default_rng(11).standard_normal((2, 4)).astype(np.float32)

# named crash points (tests/harness/crashpoints.py) and their weights
NAMED_POINTS: list[tuple[str, int]] = [
    *((f"journal:{s}:1", 3) for s in ("verify", "stage", "switch", "commit", "committed")),
    ("journal:rolled_back:1", 2),
    ("journal:start:1", 1),
    ("replace:*/state.json:1", 3),
    ("replaced:*/state.json:1", 3),
    ("replace:*/commands.json:1", 1),
    ("replace:*/commands.json:2", 2),
    ("replaced:*/commands.json:2", 2),
    ("replace:*/commands.json:3", 1),
    ("replace:journal/*:2", 1),
    ("replace:journal/*:4", 1),
    ("replace:bundles/*:1", 3),
    ("replaced:bundles/*:1", 2),
    ("fsync:*.staging/*:1", 3),
    ("fsync:*.staging/*:2", 1),
    ("replace:*/index.json:1", 1),
    ("replace:*/bundle.epk:1", 2),
    ("pwrite:*:1", 1),
    ("pwrite:*:3", 2),
    ("pwrite:*:6", 1),
]
EVENT_PHASES = ("index", "download", "downloaded", "verify", "stage", "commit")


def scale_of(minor: int) -> float:
    return 1.0 + minor / 8.0


@dataclass
class Violation:
    cycle: int
    seed: str
    point: str
    what: str

    def __str__(self) -> str:
        return f"cycle {self.cycle} (seed {self.seed!r}, point {self.point}): {self.what}"


@dataclass
class Sent:
    """A command the operator sent, and what became of it as far as the operator saw."""

    index: int
    command_id: str
    action: str
    version: str | None
    good: bool  # an install that should commit if nothing kills it (self-test passes, version forward)
    results: list[Any] = field(default_factory=list)
    rejected: list[Any] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)


class AgentProcess:
    """One ``edgepack agent run``: a plain subprocess, or a child of the fork server."""

    def __init__(self, pid: int, log: Path, popen: subprocess.Popen[bytes] | None) -> None:
        self.pid = pid
        self.log = log
        self.popen = popen

    def exit_code(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        exit_file = Path(str(self.log) + ".exit")
        if exit_file.exists():
            text = exit_file.read_text().strip()
            return int(text) if text else None
        return None

    @property
    def alive(self) -> bool:
        return self.exit_code() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                return code
            time.sleep(0.01)
        return None


class Launcher:
    """Starts agents: forked from a warm server (default) or spawned cold (``EDGEPACK_CRASH_SPAWN=1``)."""

    def __init__(self, workdir: Path, fork: bool = True) -> None:
        self.workdir = workdir
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.server: subprocess.Popen[str] | None = None
        if fork:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "tests.harness.agent_child", "--fork-server"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=self.env,
                cwd=REPO,
            )
        self.starts = 0

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> AgentProcess:
        self.starts += 1
        if self.server is None:
            with open(log, "ab") as fh:
                popen = subprocess.Popen(
                    [sys.executable, "-m", "tests.harness.agent_child", *argv],
                    stdout=fh, stderr=subprocess.STDOUT, env={**self.env, **env}, cwd=REPO,
                )  # fmt: skip
            return AgentProcess(popen.pid, log, popen)
        assert self.server.stdin is not None and self.server.stdout is not None
        self.server.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError("the agent fork server exited")
        return AgentProcess(int(json.loads(line)["pid"]), log, None)

    def close(self) -> None:
        if self.server is not None:
            assert self.server.stdin is not None
            self.server.stdin.close()
            self.server.wait(10)
            self.server = None


class EventWatch:
    """The device's events as they reach the operator; kills the agent on a chosen event at once."""

    def __init__(self, url: str, topics: Topics, device: str) -> None:
        self.topics = topics
        self.device = device
        self._cv = threading.Condition()
        self.by_command: dict[str, list[Any]] = {}
        self.trigger: tuple[str, str, AgentProcess] | None = None  # (command id, phase) -> kill this process
        self.triggered = False
        options = MqttOptions(url=url, client_id=f"crash-watch-{uuid.uuid4().hex[:8]}", protocol="5")
        self.client = MqttClient(options, on_message=self._on_message)
        self.client.subscribe([topics.events(device)])
        self.client.connect(10)

    def _on_message(self, message: Received) -> None:
        if not message.payload:
            return
        try:
            event = parse_event(message.payload)
        except EdgepackError:
            return
        with self._cv:
            trigger = self.trigger
            if (
                trigger is not None
                and event.command_id == trigger[0]
                and getattr(event, "phase", getattr(event, "kind", None)) == trigger[1]
            ):
                trigger[2].kill()
                self.triggered = True
                self.trigger = None
            self.by_command.setdefault(event.command_id or "", []).append(event)
            self._cv.notify_all()

    def events(self, command_id: str) -> list[Any]:
        with self._cv:
            return list(self.by_command.get(command_id, []))

    def close(self) -> None:
        self.client.stop()


class CrashHarness:
    """One device under the crash loop (see the module docstring)."""

    def __init__(
        self,
        workdir: Path,
        broker_url: str,
        key: SigningKey,
        trust: TrustStore,
        *,
        seed: str,
        fork: bool = True,
    ) -> None:
        self.workdir = workdir
        self.key = key
        self.trust = trust
        self.seed = seed
        self.device = f"crash-{uuid.uuid4().hex[:6]}"
        self.topics = Topics(f"c{uuid.uuid4().hex[:10]}")
        self.state_dir = workdir / "state"
        self.bundles_dir = workdir / "bundles"
        self.logs = workdir / "logs"
        for d in (self.bundles_dir, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "agent.toml"
        self.config.write_text(
            "\n".join(
                [
                    f'device_id = "{self.device}"',
                    'targets = ["x86"]',
                    f'state_dir = "{self.state_dir}"',
                    f'trust_dir = "{trust.directory}"',
                    "[runtime]",
                    "threads = 1",
                    "[broker]",
                    f'url = "{broker_url}"',
                    f'prefix = "{self.topics.prefix}"',
                    'protocol = "5"',
                    "[link]",
                    "stall_s = 0.5",
                    "need_max_s = 1.0",
                    "progress_interval_s = 0.05",
                    "reconnect_min_s = 1",
                    "reconnect_max_s = 1",
                ]
            )
            + "\n"
        )
        options = MqttOptions(url=broker_url, client_id=f"crash-op-{uuid.uuid4().hex[:8]}", protocol="5")
        self.operator = Deployer(options, self.topics)
        self.operator.connect(10)
        self.watch = EventWatch(broker_url, self.topics, self.device)
        self.launcher = Launcher(workdir, fork=fork)
        self.to = CommandTarget(device=self.device)
        self.proc: AgentProcess | None = None
        self.api: str | None = None
        # bookkeeping
        self.next_minor = 0
        self.bundles: dict[str, tuple[ChunkedBundle, int, bool]] = {}  # version -> (chunked, minor, good)
        self.digest_version: dict[str, str] = {}
        self.bad_digests: set[str] = set()
        self.sent: list[Sent] = []
        self.ever_active: set[str] = set()
        self.highest: str | None = None
        self.violations: list[Violation] = []
        self.kills: Counter[str] = Counter()
        self.cycles = 0
        self.start_seconds: list[float] = []
        self.unreported: Counter[str] = Counter()  # ended on the device, but no result reached the operator
        self._leftovers_seen: set[str] = set()
        self._point = "-"

    # --- the loop --------------------------------------------------------------------------------

    def bootstrap(self) -> None:
        """Install v1.0.0 over MQTT without a kill, so that every later cycle has a model to keep."""
        self._start(None)
        if not self._wait_ready():
            raise RuntimeError(f"the agent did not start: {self._log_tail()}")
        sent = self._send_install(self._new_version(good=True))
        if not self._wait_idle(sent) or not any(r.outcome == "committed" for r in sent.results):
            raise RuntimeError(f"the agent did not install the first version: {sent} {self._log_tail()}")
        self._stop_clean()

    def cycle(self, number: int) -> None:
        self.cycles += 1
        rng = random.Random(f"{self.seed}:{number}")
        mode = rng.choices(["named", "time", "event"], weights=[6, 3, 2])[0]
        point = rng.choices([p for p, _ in NAMED_POINTS], weights=[w for _, w in NAMED_POINTS])[0]
        self._point = point if mode == "named" else mode
        self._cycle_no, self._cycle_seed = number, f"{self.seed}:{number}"
        self._start(point if mode == "named" else None)
        if not self._after_restart():
            return  # the armed point was reached while finishing the resumed command: that was the kill
        sent = self._send_random(rng)
        proc = self.proc
        assert proc is not None
        if mode == "named":
            code = self._wait_dead_or_ended(proc, sent, 20.0)
            if code is None:  # the point is not on this command's path: kill it once the command ended
                proc.kill()
                proc.wait(10)
                self.kills["named point not on the path; killed once the command ended"] += 1
            else:
                self.kills[f"named {self._marked_point(proc)}"] += 1
        elif mode == "time":
            time.sleep(rng.uniform(0.0, 1.5))
            proc.kill()
            proc.wait(10)
            self.kills["time"] += 1
        else:
            phase = rng.choice(EVENT_PHASES if sent.action == "install" else ("verify", "stage", "commit"))
            with self.watch._cv:
                self.watch.triggered = False
                seen = [getattr(e, "phase", None) for e in self.watch.by_command.get(sent.command_id, [])]
                if phase in seen:
                    proc.kill()
                    self.watch.triggered = True
                else:
                    self.watch.trigger = (sent.command_id, phase, proc)
            if self._wait_dead_or_ended(proc, sent, 20.0) is None:
                proc.kill()
                proc.wait(10)
            with self.watch._cv:
                self.watch.trigger = None
                label = f"event {phase}" if self.watch.triggered else "event not seen; killed once the command ended"
            self.kills[label] += 1
        self.proc = None

    def _wait_dead_or_ended(self, proc: AgentProcess, sent: Sent, timeout: float) -> int | None:
        """The exit code once ``proc`` died, or None once ``sent`` has a result (or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = proc.exit_code()
            if code is not None:
                return code
            if any(e.kind in ("result", "rejected") for e in self.watch.events(sent.command_id)):
                return proc.wait(0.05)
            time.sleep(0.01)
        return None

    def finish(self) -> None:
        """A last restart without a kill: every invariant once more, then a clean stop."""
        self._point = "final"
        self._start(None)
        self._after_restart()
        self._stop_clean()
        book = self._commands_file() or {}
        done = {d.get("id"): d.get("outcome") for d in book.get("done", []) if isinstance(d, dict)}
        for sent in self.sent:
            events = self.watch.events(sent.command_id)
            if sent.command_id in done and not any(e.kind in ("result", "rejected") for e in events):
                self.unreported[done[sent.command_id]] += 1

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
        self.launcher.close()
        self.watch.close()
        self.operator.close()

    @property
    def total_kills(self) -> int:
        return sum(self.kills.values())

    # --- agent process ---------------------------------------------------------------------------

    def _start(self, point: str | None) -> None:
        from tests.mqtt.broker import free_port

        port = free_port()
        self.api = f"127.0.0.1:{port}"
        self.mark = self.workdir / "crash.mark"
        self.mark.unlink(missing_ok=True)
        env = {ENV_POINT: point or "", ENV_MARK: str(self.mark)}
        argv = ["--verbose", "agent", "run", "--config", str(self.config), "--listen", self.api]
        started = time.monotonic()
        self.proc = self.launcher.start(argv, env, self.logs / f"agent-{self.launcher.starts:04d}.log")
        self._started_at = started

    def _stop_clean(self) -> None:
        assert self.proc is not None
        if not self.proc.alive:
            self._violate(f"the agent exited on its own ({self._log_tail()})")
            self.proc = None
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        if self.proc.wait(20) is None:
            self._violate("the agent did not stop within 20 s of SIGTERM")
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def _marked_point(self, proc: AgentProcess) -> str:
        try:
            return str(json.loads(self.mark.read_text())["point"])
        except (OSError, ValueError, KeyError):
            return f"(died with {proc.exit_code()} without reaching its point)"

    def _after_restart(self) -> bool:
        """Wait for the API, check serving, let resumed work finish, check the store; False if it died."""
        assert self.proc is not None
        if not self._wait_ready():
            return self._died_during_restart()
        self.start_seconds.append(time.monotonic() - self._started_at)
        self.check_serving()
        if not self._wait_idle(self.sent[-1] if self.sent else None):
            return self._died_during_restart()
        self.check_serving()
        self.check_store()
        return True

    def _died_during_restart(self) -> bool:
        assert self.proc is not None
        code = self.proc.exit_code()
        if code is None:
            self._violate(f"the agent wedged: not ready or not idle within the timeout ({self._log_tail()})")
            self.proc.kill()
            self.proc.wait(10)
            self.kills["wedged; killed"] += 1
        elif self.mark.exists():
            self.kills[f"named {self._marked_point(self.proc)} (resumed command)"] += 1
        else:
            self._violate(f"the agent exited with {code} on its own ({self._log_tail()})")
        self.proc = None
        return False

    def _log_tail(self) -> str:
        assert self.proc is not None
        try:
            return self.proc.log.read_text(errors="replace")[-1500:]
        except OSError:
            return "no log"

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if not self.proc.alive:
                return False
            try:
                with urllib.request.urlopen(f"http://{self.api}/v2/health/live", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (OSError, urllib.error.URLError, http.client.HTTPException):
                pass
            time.sleep(0.02)
        return False

    def _commands_file(self) -> dict[str, Any] | None:
        path = self.state_dir / "commands.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {"pending": [], "done": []}
        except (OSError, ValueError):
            return None

    def _wait_idle(self, last: Sent | None) -> bool:
        """Until the agent has nothing pending and the last command sent has ended; False if it died."""
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if not self.proc.alive:
                return False
            book = self._commands_file()
            if book is not None and not book.get("pending"):
                done = {d.get("id"): d.get("outcome") for d in book.get("done", []) if isinstance(d, dict)}
                events = self.watch.events(last.command_id) if last else []
                ended = last is None or last.command_id in done or any(e.kind == "rejected" for e in events)
                if ended:
                    if last is not None:
                        self._settle(last, events, done.get(last.command_id))
                    # the result event is published after the book is written; give it a moment
                    if last is None or any(e.kind in ("result", "rejected") for e in events) or self._grace():
                        return True
            time.sleep(0.03)
        return False

    def _grace(self) -> bool:
        if not hasattr(self, "_grace_until"):
            self._grace_until = time.monotonic() + 1.0
        if time.monotonic() >= self._grace_until:
            del self._grace_until
            return True
        return False

    def _settle(self, sent: Sent, events: list[Any], outcome: str | None) -> None:
        sent.results = [e for e in events if e.kind == "result"]
        sent.rejected = [e for e in events if e.kind == "rejected"]
        sent.phases = [getattr(e, "phase", "") for e in events if e.kind == "progress"]

    # --- commands --------------------------------------------------------------------------------

    def _new_version(self, *, good: bool, pad: int = PAD, publish: bool = True) -> str:
        minor = self.next_minor
        self.next_minor += 1
        version = f"1.{minor}.0"
        scale = scale_of(minor)
        path, _manifest = linear_bundle(
            self.bundles_dir, self.key, name=MODEL, version=version, scale=scale, samples=2, pad=pad,
            selftest_scale=None if good else scale + 1.0,
        )  # fmt: skip
        chunked = chunk_bundle(path, CHUNK if pad <= PAD else 64 * 1024)
        if publish:
            self.operator.publish_bundle(chunked)
        self.bundles[version] = (chunked, minor, good)
        self.digest_version[chunked.bundle] = version
        if not good:
            self.bad_digests.add(chunked.bundle)
        return version

    def _send_install(self, version: str) -> Sent:
        chunked, _minor, good = self.bundles[version]
        command = install_command(chunked, new_command_fields(self.to))
        forward = self.highest is None or _minor_of(version) > _minor_of(self.highest)
        return self._send(command, version, good and forward)

    def _send_rollback(self) -> Sent:
        command = RollbackCommand(**new_command_fields(self.to), action="rollback", model=MODEL)
        return self._send(command, None, False)

    def _send(self, command: InstallCommand | RollbackCommand, version: str | None, good: bool) -> Sent:
        sent = Sent(len(self.sent), command.id, command.action, version, good)
        self.sent.append(sent)
        self.operator.send(sign_command(command, [self.key]))
        return sent

    def _send_random(self, rng: random.Random) -> Sent:
        kind = rng.choices(["swap", "bad", "older", "same", "rollback"], weights=[10, 2, 1, 1, 3])[0]
        if kind == "swap":
            return self._send_install(self._new_version(good=True))
        if kind == "bad":
            return self._send_install(self._new_version(good=False))
        active = self._active_version()
        if kind == "older":
            older = [v for v, (_, m, g) in self.bundles.items() if g and active and m < _minor_of(active)]
            if older:
                return self._send_install(rng.choice(older))
        if kind == "same" and active is not None:
            return self._send_install(active)
        return self._send_rollback()

    # --- invariants ------------------------------------------------------------------------------

    def _violate(self, what: str) -> None:
        self.violations.append(Violation(getattr(self, "_cycle_no", -1), getattr(self, "_cycle_seed", "-"),
                                         self._point, what))  # fmt: skip

    def _store_state(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state_dir / "state.json").read_text())
        except FileNotFoundError:
            return {"models": {}}
        except (OSError, ValueError) as exc:
            self._violate(f"state.json cannot be read: {exc}")
            return None

    def _active_version(self) -> str | None:
        state = self._store_state() or {}
        active = (state.get("models", {}).get(MODEL) or {}).get("active")
        return self.digest_version.get(active) if active else None

    def _allowed_active(self) -> set[str] | None:
        """Versions the store may name active: the last acknowledged commit's, or a later command's."""
        for sent in self.sent:  # results that arrived after their cycle moved on count as acknowledged too
            sent.results = [e for e in self.watch.events(sent.command_id) if e.kind == "result"]
        acked = [s for s in self.sent if any(r.outcome == "committed" for r in s.results)]
        if not acked:
            return None
        last = acked[-1]
        version = next(r.version for r in last.results if r.outcome == "committed")
        allowed = {version}
        for later in self.sent[last.index + 1 :]:
            if later.action == "rollback":
                allowed |= {self.digest_version[d] for d in self.ever_active}
            elif later.version is not None:
                allowed.add(later.version)
        return allowed

    def check_serving(self) -> None:
        state = self._store_state()
        if state is None:
            return
        entry = state.get("models", {}).get(MODEL) or {}
        active = entry.get("active")
        if active is None:
            if any(any(r.outcome == "committed" for r in s.results) for s in self.sent):
                self._violate("state.json names no active bundle although a commit was acknowledged")
            return
        self.ever_active.add(active)
        version = self.digest_version.get(active)
        if version is None:
            self._violate(f"state.json names an unknown active bundle {active[:12]}…")
            return
        if active in self.bad_digests:
            self._violate(f"a bundle whose self-test fails is active ({version})")
        allowed = self._allowed_active()
        if allowed is not None and version not in allowed:
            self._violate(f"an acknowledged commit was lost: active is {version}, allowed {sorted(allowed)}")
        highest = entry.get("highest_version")
        if self.highest is not None and highest is not None and _minor_of(highest) < _minor_of(self.highest):
            self._violate(f"highest_version went down from {self.highest} to {highest}")
        if highest is not None:
            self.highest = (
                highest if self.highest is None or _minor_of(highest) > _minor_of(self.highest) else self.highest
            )
        try:
            self.trust_store_reverify(active)
        except (EdgepackError, OSError) as exc:
            self._violate(f"the active bundle {version} does not verify on disk: {exc}")
        served, y = self._infer()
        if served is None:
            time.sleep(0.2)
            if self.proc is not None and not self.proc.alive:
                return  # the armed point was reached meanwhile (a resumed command): that is the kill, not a lie
            self._violate(f"no model is served over the API (store says {version} is active): {y}")
            return
        for _ in range(10):  # a resumed command switches, then commits: between the two they differ for a moment
            if served == version or self.proc is None or not self.proc.alive:
                break
            time.sleep(0.3)
            version, (served, y) = self._active_version(), self._infer()
        if served != version and self.proc is not None and self.proc.alive:
            self._violate(f"the API serves {served} where the store's active bundle is {version} (for 3 s)")
        minor = _minor_of(served) if served in self.bundles else None
        if minor is not None and not np.allclose(y, linear_reference(X, scale_of(minor)), rtol=1e-5):
            self._violate(f"the API's answers are not those of {served}")

    def trust_store_reverify(self, digest: str) -> None:
        reverify(self.state_dir / "bundles" / digest, digest, self.trust)

    def _infer(self) -> tuple[str | None, Any]:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(X.shape), "data": X.ravel().tolist()}]}
        request = urllib.request.Request(
            f"http://{self.api}/v2/models/{MODEL}/infer",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return None, f"HTTP {exc.code}: {exc.read()[:300]!r}"
        except (OSError, urllib.error.URLError, ValueError, http.client.HTTPException) as exc:
            return None, repr(exc)  # IncompleteRead: the agent reached its armed point while answering
        out = answer["outputs"][0]
        return answer.get("model_version"), np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])

    def _tmp_files(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.state_dir))
            for p in _walk(self.state_dir)
            if p.name.endswith(".tmp")
            if "cache" not in p.relative_to(self.state_dir).parts
        )

    def check_store(self) -> None:
        """The idle store: referenced bundles exist and verify, nothing else, no leftovers, journals ended."""
        state = self._store_state()
        if state is None:
            return
        referenced = {d for m in state.get("models", {}).values() for d in (m.get("active"), m.get("previous")) if d}
        on_disk = {p.name for p in (self.state_dir / "bundles").iterdir()}
        for digest in sorted(referenced - on_disk):
            self._violate(f"state.json names bundle {digest[:12]}…, which is not in the store")
        for name in sorted(on_disk - referenced):
            self._violate(f"bundles/{name} is left in the store although nothing references it")
        for digest in sorted(referenced & on_disk):
            try:
                self.trust_store_reverify(digest)
            except (EdgepackError, OSError) as exc:
                self._violate(f"stored bundle {digest[:12]}… does not verify: {exc}")
        for sub in ("tmp", "incoming"):
            left = self._left_in(sub)
            deadline = time.monotonic() + 2.0
            while left and time.monotonic() < deadline:  # a moment late (an unlink after the result) or left for good?
                time.sleep(0.1)
                left = self._left_in(sub)
            if left:
                self._violate(f"{sub}/ is not empty 2 s after the agent went idle: {left}")
        new = [p for p in self._tmp_files() if p not in self._leftovers_seen]
        deadline = time.monotonic() + 2.0
        while new and time.monotonic() < deadline:  # an atomic write in flight (the command book noting an ack)?
            time.sleep(0.1)
            new = [p for p in self._tmp_files() if p in new]
        if new and self.proc is not None and not self.proc.alive:
            # the agent reached its armed point in a write it made after going idle (the command book noting
            # the broker's ack of a result): that kill is this cycle's, and the next restart must clean it up
            new = []
        self._leftovers_seen.update(new)
        if new:  # each one once: a leftover stays until something removes it
            self._violate(f"temporary files of atomic writes are left after the restart: {new}")
        for path in sorted((self.state_dir / "journal").glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                self._violate(f"journal {path.name} cannot be read: {exc}")
                continue
            if data.get("outcome") is None:
                self._violate(f"journal {path.name} has no outcome (state {data.get('state')})")

    def _left_in(self, sub: str) -> list[str]:
        root = self.state_dir / sub
        if not root.is_dir():
            return []
        return sorted(str(p.relative_to(root)) for p in _walk(root, dirs=True))

    def report(self) -> str:
        starts = sorted(self.start_seconds)
        median = starts[len(starts) // 2] if starts else float("nan")
        lines = [
            f"crash harness: seed {self.seed!r}, {self.cycles} cycles, {self.total_kills} SIGKILLs, "
            f"{self.launcher.starts} agent starts (median start to live API {median:.2f} s), "
            f"{len(self.sent)} commands sent, {len(self.violations)} violation(s)",
            *(f"  {n:4d} x {what}" for what, n in sorted(self.kills.items(), key=lambda kv: (-kv[1], kv[0]))),
        ]
        outcomes = Counter(r.outcome for s in self.sent for r in s.results)
        lines.append(f"  results seen by the operator: {dict(outcomes)}")
        if self.unreported:
            lines.append(
                f"  commands that ended on the device without a result event (the kill fell between the book "
                f"recording the outcome and the event): {dict(self.unreported)}"
            )
        return "\n".join(lines)


def reverify(directory: Path, digest: str, trust: TrustStore) -> None:
    """What the agent checks at boot, done from outside and read-only (the running agent holds the store):
    the directory's name is its manifest's hash, the signatures verify, every payload file matches."""
    manifest_bytes = (directory / MANIFEST_NAME).read_bytes()
    if bundle_hash(manifest_bytes) != digest:
        raise InstallError(f"bundle {digest[:12]}… does not match its name")
    manifest = parse_manifest(manifest_bytes)
    trust.verify("manifest", manifest_bytes, decode_signatures((directory / SIGNATURES_NAME).read_bytes()), "bundle")
    for pinned in manifest.files:
        if file_digest(directory / pinned.path) != (pinned.size, pinned.sha256):
            raise InstallError(f"{pinned.path} does not match the manifest")
    listed = {f.path for f in manifest.files} | {MANIFEST_NAME, SIGNATURES_NAME}
    extra = sorted(str(p.relative_to(directory)) for p in _walk(directory))
    extra = [p for p in extra if p not in listed]
    if extra:
        raise InstallError(f"files the manifest does not list: {extra}")


def _walk(root: Path, *, dirs: bool = False) -> list[Path]:
    """Files (and with ``dirs`` directories) under ``root``; entries the agent deletes meanwhile are skipped."""
    out = []
    for top, subdirs, files in os.walk(root):
        out += [Path(top) / name for name in files + (subdirs if dirs else [])]
    return out


def _minor_of(version: str) -> int:
    return int(version.split(".")[1])


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
