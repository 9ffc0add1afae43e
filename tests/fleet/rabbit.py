"""A two-node RabbitMQ cluster with the MQTT plugin, of our own, for the cluster tests and measurements.

Debian's ``rabbitmq-server`` (3.10: MQTT 3.1.1 only) is started twice from its own scripts, each node
with its own node name, AMQP/MQTT/distribution ports and ``RABBITMQ_MNESIA_BASE``/``LOG_BASE`` under a
temporary directory, and a shared Erlang cookie (``$HOME/.erlang.cookie`` of a private ``HOME``); the
second node joins the first with ``rabbitmqctl join_cluster``. A system node already running on 5672 is
left alone (other ports, other names; the one ``epmd`` serves all).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def find_rabbitmq() -> str | None:
    """The ``rabbitmq-server`` script, or None when RabbitMQ is not installed. Debian's ``/usr/sbin`` wrappers
    switch to the ``rabbitmq`` user and its environment, so the scripts behind them are used."""
    for directory in ("/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin"):
        if (Path(directory) / "rabbitmq-server").exists() and (Path(directory) / "rabbitmqctl").exists():
            return str(Path(directory) / "rabbitmq-server")
    server = shutil.which("rabbitmq-server")
    return server if server and shutil.which("rabbitmqctl") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RabbitNode:
    name: str
    mqtt_port: int
    amqp_port: int
    dist_port: int
    base: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"


class RabbitCluster:
    """``nodes`` RabbitMQ nodes clustered together; :attr:`nodes` [0] is the first (the one others join)."""

    def __init__(self, root: Path, nodes: int = 2, tag: str | None = None) -> None:
        self.root = Path(root)
        self.tag = tag or secrets.token_hex(3)
        self.home = self.root / "home"
        self.nodes = [
            RabbitNode(f"ep{self.tag}{i}@localhost", _free_port(), _free_port(), _free_port(), self.root / f"n{i}")
            for i in range(nodes)
        ]
        self.server = find_rabbitmq() or "rabbitmq-server"
        self.ctl = str(Path(self.server).with_name("rabbitmqctl"))

    def _env(self, node: RabbitNode) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_PORT": str(node.amqp_port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.base / "log"),
            "RABBITMQ_PID_FILE": str(node.base / "node.pid"),
            "RABBITMQ_CONFIG_FILE": str(node.base / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.base / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(node.base / "plugins-expand"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.base / "advanced.config"),
        })  # fmt: skip
        return env

    def ctl_run(self, node: RabbitNode, *args: str, timeout: float = 120) -> str:
        out = subprocess.run([self.ctl, "-n", node.name, *args], env=self._env(node), capture_output=True,
                             text=True, timeout=timeout)  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {node.name}: {out.stderr.strip() or out.stdout}")
        return out.stdout

    def start(self, timeout: float = 180) -> RabbitCluster:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        for node in self.nodes:
            (node.base / "log").mkdir(parents=True, exist_ok=True)
            (node.base / "rabbitmq.conf").write_text(
                f"listeners.tcp.default = {node.amqp_port}\n"
                f"mqtt.listeners.tcp.default = {node.mqtt_port}\n"
                "mqtt.allow_anonymous = true\n"
                "loopback_users = none\n"
                "log.console = false\n"
                "log.file.level = warning\n"
            )  # fmt: skip
            (node.base / "advanced.config").write_text("[].\n")
            (node.base / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
            node.proc = subprocess.Popen([self.server], env=self._env(node), stdout=subprocess.DEVNULL,
                                         stderr=open(node.base / "server.err", "wb"),  # noqa: SIM115
                                         start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            self._await(node, deadline)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl_run(node, "stop_app")
            self.ctl_run(node, "join_cluster", first.name)
            self.ctl_run(node, "start_app")
            self._await(node, time.monotonic() + timeout)
        deadline = time.monotonic() + 60
        for node in self.nodes:
            while not _listening(node.mqtt_port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {node.name} does not listen for MQTT on {node.mqtt_port}")
                time.sleep(0.2)
        return self

    def _await(self, node: RabbitNode, deadline: float) -> None:
        """Until the node has booted (``await_startup`` fails at once while the node is not registered yet)."""
        while True:
            if node.proc is not None and node.proc.poll() is not None:
                err = (node.base / "server.err").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"RabbitMQ node {node.name} exited ({node.proc.returncode}): {err}")
            try:
                self.ctl_run(node, "await_startup", "--timeout", "30", timeout=45)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def running_nodes(self) -> list[str]:
        out = self.ctl_run(self.nodes[0], "cluster_status", "--formatter", "json")
        return sorted(json.loads(out).get("running_nodes", []))

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):  # killed below then
                self.ctl_run(node, "stop", timeout=60)
            try:
                node.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(10)

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
