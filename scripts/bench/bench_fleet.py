"""Benchmark: a whole-fleet rollout of a 5 MB bundle to 100, 300 and 1,000 simulated devices.

Goals (issue 13): a 1,000-device rollout in under 3 minutes on this machine; broker ingress for the
rollout about one copy of the bundle whatever the fleet size (≤ 1.1 × bundle + a few kB per device);
operator memory flat in N.

Setup: one local mosquitto (persistence off, ``sys_interval 1`` for its ``$SYS`` counters); the devices
are ``edgepack.fleet.sim`` workers (the real agent, link, receiver, command book and store per device;
the stand-in runtime, which loads nothing); the operator is a separate ``edgepack fleet rollout`` process
(waves ``1,10%,50%,100%``, gate 100%, its own journal), so its CPU and peak memory are its own
(``wait4`` rusage). Measured per fleet size:

- **wall**: from starting the operator until it exits with every device ``succeeded`` (the upload, four
  waves with their gates, every device's download, verification, stand-in self-test, swap and commit);
- **ingress**: ``$SYS/broker/bytes/received`` before and after (everything every client sent the broker:
  the operator's bundle and commands, the devices' events and states), as MB, as × bundle, and what
  remains per device once one bundle copy is taken off;
- **egress**: ``$SYS/broker/bytes/sent`` (the broker's fan-out: about N bundle copies);
- **operator CPU** (user + system s) and **peak RSS** (MB).

Writes scripts/bench/results/fleet.json, fleet.md and fleet.png.

    .venv/bin/python scripts/bench/bench_fleet.py [--devices 100 300 1000] [--size-mb 5]

``--rabbit N``: instead, a two-node RabbitMQ cluster (``tests/fleet/rabbit.py``; MQTT 3.1.1) with N
simulated devices all on node B (state heartbeat 2 s) and the operator on node A, twice: with
``--node B`` (every retained message written on both nodes) and with node A only (the devices' ``need``
path). Measured: wall, the devices' needs, what the operator published again, and the operator's upload
(the bundle once per node plus republished chunks, counted by the operator; RabbitMQ 3.10 lists no
per-connection byte counters for MQTT clients). Writes results/fleet_cluster.json and .md.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from results import RESULTS, write_results  # noqa: E402

from edgepack.fleet.journal import Journal  # noqa: E402
from edgepack.fleet.sim import SimSpec, Simulator, make_bundle  # noqa: E402
from edgepack.keys import SigningKey  # noqa: E402
from edgepack.mqtt import MqttClient, MqttOptions  # noqa: E402
from edgepack.trust import TrustStore  # noqa: E402
from tests.mqtt.broker import Mosquitto, find_mosquitto  # noqa: E402


class SysCounters:
    """The broker's ``$SYS/broker/bytes/*`` totals, as last published (every second)."""

    def __init__(self, url: str) -> None:
        self.values: dict[str, int] = {}
        self._cv = threading.Condition()
        self.client = MqttClient(MqttOptions(url=url, client_id=f"sys-{uuid.uuid4().hex[:6]}", protocol="5"),
                                 on_message=self._on_message)  # fmt: skip
        self.client.subscribe(["$SYS/broker/bytes/received", "$SYS/broker/bytes/sent"])
        self.client.connect(10)

    def _on_message(self, message) -> None:
        with self._cv:
            self.values[message.topic.rsplit("/", 1)[1]] = int(message.payload)
            self._cv.notify_all()

    def fresh(self) -> dict[str, int]:
        """Counters published after this call (the broker publishes them once a second)."""
        with self._cv:
            self.values.clear()
            self._cv.wait_for(lambda: len(self.values) == 2, 10)
            return dict(self.values)

    def stop(self) -> None:
        self.client.stop()


def run_one(n: int, work: Path, broker: Mosquitto, trust: Path, key_file: Path, bundle: Path,
            counters: SysCounters) -> dict:  # fmt: skip
    processes = max(2, math.ceil(n / 150))
    prefix = f"bench{n}-{uuid.uuid4().hex[:6]}"
    spec = SimSpec(broker=broker.url, trust=trust, root=work / f"sim{n}", devices=n, prefix=prefix,
                   processes=processes, stall_s=10.0)  # fmt: skip
    journal = work / f"journal{n}.sqlite"
    started_sim = time.monotonic()
    with Simulator(spec):
        sim_start_s = time.monotonic() - started_sim
        before = counters.fresh()
        load_before = os.getloadavg()[0]
        started = time.monotonic()
        operator = subprocess.Popen(
            [sys.executable, "-m", "edgepack", "fleet", "rollout", str(bundle), "--group", "group=sim",
             "--waves", "1,10%,50%,100%", "--timeout", "10m", "--key", str(key_file), "--broker", broker.url,
             "--prefix", prefix, "--journal", str(journal), "--protocol", "5", "--json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, status, usage = os.wait4(operator.pid, 0)
        wall = time.monotonic() - started
        load_after = os.getloadavg()[0]
        after = counters.fresh()
    rows = Journal(journal).counts(Journal(journal).rollouts(1)[0].id)
    shutil.rmtree(spec.root, ignore_errors=True)
    size = bundle.stat().st_size
    ingress = after["received"] - before["received"]
    return {
        "devices": n,
        "processes": processes,
        "sim_start_s": round(sim_start_s, 1),
        "wall_s": round(wall, 1),
        "succeeded": rows.get("succeeded", 0),
        "exit": os.waitstatus_to_exitcode(status),
        "ingress_mb": round(ingress / 1e6, 2),
        "ingress_x_bundle": round(ingress / size, 3),
        "ingress_kb_per_device_beyond_bundle": round((ingress - size) / n / 1e3, 2),
        "egress_mb": round((after["sent"] - before["sent"]) / 1e6, 1),
        "operator_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "operator_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "host_load_1m": f"{load_before:.0f}→{load_after:.0f}",
    }


def plot(rows: list[dict], size_mb: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["devices"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(n, [r["wall_s"] for r in rows], "o-")
    axes[0].axhline(180, color="red", ls="--", label="goal: 3 min at 1,000")
    axes[0].set(title="rollout wall time", xlabel="devices", ylabel="s")
    axes[1].plot(n, [r["ingress_mb"] for r in rows], "o-", label="broker ingress")
    axes[1].axhline(size_mb * 1.1, color="red", ls="--", label="1.1 × bundle")
    axes[1].set(title=f"broker ingress ({size_mb:g} MB bundle)", xlabel="devices", ylabel="MB")
    axes[2].plot(n, [r["operator_peak_rss_mb"] for r in rows], "o-", label="peak RSS (MB)")
    axes[2].plot(n, [r["operator_cpu_s"] for r in rows], "s-", label="CPU (s)")
    axes[2].set(title="operator process", xlabel="devices")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def run_cluster(n: int, size_mb: float) -> None:
    from edgepack.fleet.engine import RolloutEngine, create_rollout
    from edgepack.fleet.plan import RolloutPlan, parse_waves
    from tests.fleet.rabbit import RabbitCluster, find_rabbitmq

    if find_rabbitmq() is None:
        raise SystemExit("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-rabbit-"))
    cluster = RabbitCluster(work / "rabbit").start()
    rows = []
    try:
        a, b = cluster.nodes
        key = SigningKey.generate()
        key.save(work / "keys", "release")
        trust = TrustStore.init(work / "trust", [work / "keys" / "release.pub"]).directory
        for variant, nodes in (("with --node B", [b.url]), ("node A only", [])):
            prefix = f"rb{n}-{uuid.uuid4().hex[:6]}"
            version = "2.0.0" if nodes else "3.0.0"
            bundle = make_bundle(work / f"fleet-{version}.epk", key, version=version, size=int(size_mb * 1e6))
            spec = SimSpec(broker=b.url, trust=trust, root=work / f"sim-{prefix}", devices=n, prefix=prefix,
                           processes=max(2, math.ceil(n / 150)), protocol="3.1.1", stall_s=5.0,
                           state_interval_s=2.0)  # fmt: skip
            with Simulator(spec):
                journal = Journal(work / f"journal-{prefix}.sqlite")
                plan = RolloutPlan(waves=parse_waves("1,10%,50%,100%"), device_timeout_s=600)
                rid = create_rollout(journal, bundle, selector="group=sim", plan=plan, prefix=prefix)
                time.sleep(3.0)  # one heartbeat: the operator learns the devices from live states
                opts = [MqttOptions(url=u, client_id=f"op-{uuid.uuid4().hex[:6]}", protocol="3.1.1")
                        for u in (a.url, *nodes)]  # fmt: skip
                engine = RolloutEngine(journal, rid, options=opts[0], keys=[key], nodes=opts[1:])
                started = time.monotonic()
                rollout = engine.run()
                wall = time.monotonic() - started
                counts = journal.counts(rid)
                history = journal.history(rid)
            size = bundle.stat().st_size
            upload = size * (1 + len(nodes)) + engine.deployer.republished_bytes
            rows.append({
                "variant": variant, "devices": n, "status": rollout.status, "succeeded": counts.get("succeeded", 0),
                "wall_s": round(wall, 1), "republished_chunks": engine.deployer.republished,
                "republished_mb": round(engine.deployer.republished_bytes / 1e6, 2),
                "operator_upload_mb": round(upload / 1e6, 2), "operator_upload_x_bundle": round(upload / size, 2),
                "needs": engine.deployer.needs_received,
                "transitions": len(history),
            })  # fmt: skip
            print(rows[-1], flush=True)
            shutil.rmtree(spec.root, ignore_errors=True)
        notes = [
            f"bundle {size_mb:g} MB, 256 KiB chunks, waves 1,10%,50%,100%; RabbitMQ 3.10 (rabbitmq_mqtt, MQTT 3.1.1), "
            "two nodes on this host; every simulated device on node B, the operator on node A",
            "operator upload: the bundle once per node it writes to, plus what it published again for needs "
            "(commands, ~1.3 kB per device per node, not counted); needs: the devices' need events it received",
        ]
        write_results("fleet_cluster", rows, title="Fleet rollout on a two-node RabbitMQ cluster", notes=notes)
        print(f"wrote {RESULTS / 'fleet_cluster.md'}")
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--size-mb", type=float, default=5.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--rabbit", type=int, default=None, help="devices on a two-node RabbitMQ cluster instead")
    args = parser.parse_args()
    if args.rabbit:
        run_cluster(args.rabbit, args.size_mb)
        return
    binary = find_mosquitto()
    if binary is None:
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-", dir=args.workdir))
    broker = Mosquitto(binary, work / "mosquitto", extra_config=("sys_interval 1", "max_queued_messages 100000"))
    broker.start()
    counters = SysCounters(broker.url)
    try:
        key = SigningKey.generate()
        key.save(work / "keys", "release")
        trust = TrustStore.init(work / "trust", [work / "keys" / "release.pub"]).directory
        bundle = make_bundle(work / "fleet-2.0.0.epk", key, version="2.0.0", size=int(args.size_mb * 1e6))
        rows = []
        for n in args.devices:
            row = run_one(n, work, broker, trust, work / "keys" / "release.key", bundle, counters)
            print(row, flush=True)
            rows.append(row)
        notes = [
            f"bundle {bundle.stat().st_size / 1e6:.2f} MB, 256 KiB chunks; waves 1,10%,50%,100%, gate 100%",
            "devices: edgepack.fleet.sim workers (real agent + link per device, stand-in runtime), "
            "spread over the 'processes' column; operator: a separate 'edgepack fleet rollout' process",
            "ingress: mosquitto $SYS/broker/bytes/received over the rollout (all clients)",
            "host_load_1m: the 1-minute load average at the operator's start and exit (2 cores, shared with "
            "other work; the simulated devices themselves add much of it)",
        ]
        write_results("fleet", rows, title="Fleet rollout: wall time, broker ingress, operator cost", notes=notes)
        plot(rows, args.size_mb, RESULTS / "fleet.png")
        print(f"wrote {RESULTS / 'fleet.md'} and {RESULTS / 'fleet.png'}")
    finally:
        counters.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
