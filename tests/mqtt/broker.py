"""A real mosquitto for the MQTT tests: started on 127.0.0.1 on a free port, stoppable and restartable."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    for candidate in MOSQUITTO_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, *, up: bool, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.02)
    raise TimeoutError(f"port {port} did not come {'up' if up else 'down'} within {timeout} s")


@dataclass
class Mosquitto:
    """One mosquitto process (persistence off) that tests may stop and start again on the same port."""

    binary: str
    directory: Path
    port: int = field(default_factory=free_port)
    extra_config: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    # replaces the plain anonymous listener: e.g. the lines of a generated mosquitto.conf (tests/mqtt/test_broker_acl.py)
    base_config: tuple[str, ...] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def conf(self) -> Path:
        return self.directory / "mosquitto.conf"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "\n".join(
                [
                    *(self.base_config or (f"listener {self.port} 127.0.0.1", "allow_anonymous true")),
                    "persistence false",
                    *(["user root"] if os.geteuid() == 0 else []),  # keep reading files under the test's tmp_path
                    *self.extra_config,
                ]
            )
            + "\n"
        )
        log = open(self.directory / "mosquitto.log", "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_port(self.port, up=True)
        time.sleep(0.05)  # mosquitto opens the socket before it reads certificates; let it fail first if it does
        if self.proc.poll() is not None:
            tail = (self.directory / "mosquitto.log").read_text()[-800:]
            raise RuntimeError(f"mosquitto exited at start:\n{tail}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None
        wait_port(self.port, up=False)

    def restart(self, downtime: float = 0.0) -> None:
        self.stop()
        time.sleep(downtime)
        self.start()
