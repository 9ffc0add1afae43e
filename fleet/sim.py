"""The fleet simulator: many devices running the real agent code against one real broker.

Each simulated device is a real :class:`~edgepack.agent.service.DeviceAgent` (store, install state
machine, self-test) with a real :class:`~edgepack.agent.link.AgentLink` (protocol, receiver, command
book, state and events) and its own MQTT connection; only the runtime is the stand-in of
``fleet/standin.py``, which loads nothing. The devices are spread over a few worker processes.

Faults, each given to a deterministic share of the devices (``--fault selftest=5%``):

- ``selftest``: the runtime answers off by one, so the bundle's self-test fails (result ``rolled_back``;
  the rollout counts the device ``failed``);
- ``offline``: the device goes offline in the middle of its transfer and comes back ``--offline-s`` later
  (it resumes the transfer from its disk and succeeds);
- ``vanish``: goes offline in the middle of its transfer and never comes back (``timed_out``);
- ``slow``: takes chunks in at ``--slow-rate`` bytes/s (succeeds, late; ``offline`` and ``vanish`` devices
  are paced the same way, so that there is a transfer to interrupt);
- ``mute``: keeps an MQTT connection and an online state but never answers a command (``timed_out``).

Usage (or ``scripts/fleet-sim``)::

    python -m edgepack.fleet.sim bundle OUT.epk --key release.key --size 5M --version 2.0.0
    python -m edgepack.fleet.sim run --broker mqtt://127.0.0.1:1883 --trust TRUST --root /tmp/sim \\
        --devices 200 --processes 4 --fault selftest=5% --fault mute=2%      # until Ctrl-C

and from Python, :class:`Simulator` (a context manager) starts and stops the worker processes.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FAULTS = ("selftest", "offline", "vanish", "slow", "mute")
PREDICTED = {None: "succeeded", "selftest": "failed", "offline": "succeeded", "vanish": "timed_out",
             "slow": "succeeded", "mute": "timed_out"}  # fmt: skip


@dataclass
class SimSpec:
    """What to simulate; the same in the parent and in every worker process (passed as arguments)."""

    broker: str
    trust: Path
    root: Path
    devices: int
    prefix: str = "edgepack"
    processes: int = 2
    faults: dict[str, float] = field(default_factory=dict)  # fault -> share of the devices, 0..1
    labels: dict[str, str] = field(default_factory=lambda: {"group": "sim"})
    id_prefix: str = "sim"
    protocol: str = "5"
    offline_s: float = 3.0
    slow_rate: int = 256 * 1024
    stall_s: float = 2.0
    state_interval_s: float = 0.0  # a state heartbeat (brokers without retained wildcard delivery: RabbitMQ)

    def device_id(self, index: int) -> str:
        return f"{self.id_prefix}-{index:04d}"

    def fault_of(self) -> dict[int, str]:
        """Device index -> its fault: spread evenly over the fleet, the same every run."""
        out: dict[int, str] = {}
        free = list(range(self.devices))
        for fault in FAULTS:
            share = self.faults.get(fault, 0.0)
            count = min(len(free), round(self.devices * share))
            if count <= 0:
                continue
            step = len(free) / count
            chosen = [free[math.floor(i * step + step / 2)] for i in range(count)]
            for index in chosen:
                out[index] = fault
            free = [i for i in free if i not in set(chosen)]
        return out

    def predicted(self) -> dict[str, int]:
        """The execution states a rollout to the whole simulated fleet should end with (no retries)."""
        faults = self.fault_of()
        counts: dict[str, int] = {}
        for index in range(self.devices):
            state = PREDICTED[faults.get(index)]
            counts[state] = counts.get(state, 0) + 1
        return counts

    def to_args(self) -> list[str]:
        args = ["--broker", self.broker, "--trust", str(self.trust), "--root", str(self.root),
                "--devices", str(self.devices), "--prefix", self.prefix, "--processes", str(self.processes),
                "--id-prefix", self.id_prefix, "--protocol", self.protocol, "--offline-s", str(self.offline_s),
                "--slow-rate", str(self.slow_rate), "--stall-s", str(self.stall_s),
                "--state-interval-s", str(self.state_interval_s)]  # fmt: skip
        for fault, share in self.faults.items():
            args += ["--fault", f"{fault}={share * 100:g}%"]
        for key, value in self.labels.items():
            args += ["--label", f"{key}={value}"]
        return args


# --- one worker process ----------------------------------------------------------------------------


class _Mute:
    """A device that holds a connection and an online state but never reads a command."""

    def __init__(self, spec: SimSpec, device: str) -> None:
        from edgepack.manifest import utc_now
        from edgepack.mqtt import MqttClient, MqttOptions, Will
        from edgepack.protocol import DeviceState, Topics, encode, groups_from_labels

        topics = Topics(spec.prefix)
        self.device_id = device

        def state(online: bool) -> bytes:
            return encode(DeviceState(device=device, online=online, at=utc_now(), labels=spec.labels,
                                      groups=groups_from_labels(spec.labels), targets=["x86"]))  # fmt: skip

        self.client = MqttClient(
            MqttOptions(url=spec.broker, client_id=device, protocol=spec.protocol),
            on_connect=lambda _: self.client.publish(topics.state(device), state(True), retain=True),
        )
        self.client.set_will(Will(topics.state(device), state(False), 1, True, 0))

    @property
    def connected(self) -> bool:
        return self.client.is_connected

    def start(self) -> None:
        self.client.start()

    def stop(self) -> None:
        self.client.stop()


class _Device:
    """One simulated device: the real agent and link, with its fault."""

    def __init__(self, spec: SimSpec, index: int, fault: str | None) -> None:
        import dataclasses

        from edgepack.agent.config import load_config
        from edgepack.agent.link import LinkOptions
        from edgepack.agent.service import DeviceAgent

        self.spec, self.fault, self.device_id = spec, fault, spec.device_id(index)
        config = load_config(None, {
            "device_id": self.device_id, "state_dir": str(spec.root / self.device_id), "trust_dir": str(spec.trust),
            "targets": ["x86"], "listen": "127.0.0.1:0", "labels": spec.labels, "broker.url": spec.broker,
            "broker.prefix": spec.prefix, "broker.protocol": spec.protocol,
        })  # fmt: skip
        self.agent = DeviceAgent(config)
        self.agent.boot()
        if fault == "selftest":
            self.agent.installer.options = dataclasses.replace(self.agent.installer.options, extra={"fault": fault})
        self.options = LinkOptions(
            stall_s=spec.stall_s, need_max_s=max(spec.stall_s, 10.0), progress_interval_s=1.0, reconnect_min_s=1,
            reconnect_max_s=5, max_rate=spec.slow_rate if fault in ("slow", "offline", "vanish") else None,
            state_interval_s=spec.state_interval_s,
        )  # fmt: skip
        self.link = self._new_link()
        self.dropped = False

    def _new_link(self) -> Any:
        from edgepack.agent.link import AgentLink

        return AgentLink(self.agent, self.options)

    @property
    def connected(self) -> bool:
        return bool(self.link.connected)

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        self.link.stop()
        self.agent.close()

    def mid_transfer(self) -> bool:
        status = self.link.status()
        return bool(status.get("current")) and status["counters"].get("received_bytes", 0) > 0

    def drop(self) -> None:
        """Go offline now; ``offline`` comes back after ``offline_s`` with a new link (as after a reboot)."""
        self.dropped = True
        self.link.stop(timeout=2.0)
        if self.fault == "offline":
            time.sleep(self.spec.offline_s)
            self.link = self._new_link()
            self.link.start()


def run_shard(spec: SimSpec, shard: int, stop: threading.Event) -> None:
    """Run the devices ``shard, shard + processes, …`` until ``stop``; prints ``ready N`` once all are online."""
    from edgepack.fleet.standin import use_stand_in

    use_stand_in()
    faults = spec.fault_of()
    devices: list[Any] = []
    for index in range(shard, spec.devices, spec.processes):
        fault = faults.get(index)
        device = _Mute(spec, spec.device_id(index)) if fault == "mute" else _Device(spec, index, fault)
        device.start()
        devices.append(device)
    while not stop.is_set() and not all(d.connected for d in devices):
        time.sleep(0.1)
    print(f"ready {len(devices)}", flush=True)
    droppers = [d for d in devices if isinstance(d, _Device) and d.fault in ("offline", "vanish")]
    while not stop.wait(0.05):
        for device in droppers:
            if not device.dropped and device.mid_transfer():
                threading.Thread(target=device.drop, daemon=True).start()
    for device in devices:
        try:
            device.stop()
        except Exception:  # stopping: report, go on with the others
            log.exception("stopping simulated device %s", device.device_id)


# --- the parent ------------------------------------------------------------------------------------


class Simulator:
    """Starts the worker processes of a :class:`SimSpec` and waits until every device is online."""

    def __init__(self, spec: SimSpec, *, log_dir: Path | None = None) -> None:
        self.spec = spec
        self.log_dir = log_dir or spec.root
        self.procs: list[subprocess.Popen[str]] = []

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 300.0) -> None:
        self.spec.root.mkdir(parents=True, exist_ok=True)
        for shard in range(self.spec.processes):
            err = open(self.log_dir / f"sim-{self.spec.id_prefix}-{shard}.log", "w")  # noqa: SIM115 - the child owns it
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "edgepack.fleet.sim", "shard", str(shard), *self.spec.to_args()],
                stdout=subprocess.PIPE, stderr=err, text=True,
            ))  # fmt: skip
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            assert proc.stdout is not None
            line = _readline(proc, deadline)
            if not line.startswith("ready"):
                self.stop()
                raise RuntimeError(f"simulator process {proc.pid} did not start its devices (see {self.log_dir})")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs = []

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def _readline(proc: subprocess.Popen[str], deadline: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline() if proc.stdout else ""))
    reader.daemon = True
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    return result[0] if result else ""


# --- bundles for simulated devices -----------------------------------------------------------------


def make_bundle(out: Path, key: Any, *, version: str = "1.0.0", size: int = 64 * 1024, name: str = "sim",
                seed: int = 0) -> Path:  # fmt: skip
    """A signed bundle of about ``size`` bytes (random payload) that only the stand-in runtime can 'run':
    two self-test samples of a [1, 4] -> [1, 3] model."""
    from edgepack.bundle import BundleFile, write_bundle
    from edgepack.manifest import RuntimeRequirement, SelfTest, TensorSpec
    from edgepack.selftest import write_vectors

    src = out.parent / f"{out.stem}-src"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (src / "model.bin").write_bytes(rng.bytes(max(1, size)))
    inputs = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(2)]
    outputs = [{"y": rng.standard_normal((1, 3)).astype(np.float32)} for _ in range(2)]
    write_vectors(src / "selftest.npz", inputs, outputs)
    write_bundle(
        out, files=[BundleFile("model.bin", src / "model.bin", "model"),
                    BundleFile("selftest.npz", src / "selftest.npz", "selftest")],
        signers=[key], name=name, version=version, target="x86",
        runtime=RuntimeRequirement(name="onnxruntime", version=">=1.16"), model_file="model.bin",
        inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 3])],
        selftest=SelfTest(vectors="selftest.npz", atol=1e-4, rtol=1e-4, samples=2),
    )  # fmt: skip
    return out


# --- command line ----------------------------------------------------------------------------------


def _spec(args: argparse.Namespace) -> SimSpec:
    from edgepack.fleet.plan import parse_percent

    faults = {}
    for item in args.fault:
        fault, _, share = item.partition("=")
        if fault not in FAULTS:
            raise SystemExit(f"--fault {item!r}: the faults are {', '.join(FAULTS)}")
        faults[fault] = parse_percent(share, "--fault share") / 100
    labels = dict(label.split("=", 1) for label in args.label) or {"group": "sim"}
    return SimSpec(broker=args.broker, trust=Path(args.trust), root=Path(args.root), devices=args.devices,
                   prefix=args.prefix, processes=args.processes, faults=faults, labels=labels,
                   id_prefix=args.id_prefix, protocol=args.protocol, offline_s=args.offline_s,
                   slow_rate=args.slow_rate, stall_s=args.stall_s, state_interval_s=args.state_interval_s)  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet-sim", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bundle = sub.add_parser("bundle", help="write a signed bundle for simulated devices")
    bundle.add_argument("out")
    bundle.add_argument("--key", required=True)
    bundle.add_argument("--size", default="64k")
    bundle.add_argument("--version", default="1.0.0")
    bundle.add_argument("--name", default="sim")
    for name in ("run", "shard"):
        p = sub.add_parser(name, help="run the simulated devices" if name == "run" else argparse.SUPPRESS)
        if name == "shard":
            p.add_argument("index", type=int)
        p.add_argument("--broker", required=True)
        p.add_argument("--trust", required=True)
        p.add_argument("--root", required=True)
        p.add_argument("--devices", type=int, default=100)
        p.add_argument("--processes", type=int, default=max(1, min(4, os.cpu_count() or 1)))
        p.add_argument("--prefix", default="edgepack")
        p.add_argument("--fault", action="append", default=[], help="FAULT=SHARE, e.g. selftest=5%%")
        p.add_argument("--label", action="append", default=[], help="KEY=VALUE for every device")
        p.add_argument("--id-prefix", default="sim")
        p.add_argument("--protocol", default="5")
        p.add_argument("--offline-s", type=float, default=3.0)
        p.add_argument("--slow-rate", type=int, default=256 * 1024)
        p.add_argument("--stall-s", type=float, default=2.0)
        p.add_argument("--state-interval-s", type=float, default=0.0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "bundle":
        from edgepack.keys import SigningKey
        from edgepack.units import parse_size

        make_bundle(Path(args.out), SigningKey.load(Path(args.key)), version=args.version,
                    size=parse_size(args.size, "--size"), name=args.name)  # fmt: skip
        print(args.out)
        return
    spec = _spec(args)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if args.command == "shard":
        run_shard(spec, args.index, stop)
        return
    with Simulator(spec):
        print(f"{spec.devices} simulated devices online ({spec.processes} processes); Ctrl-C stops", flush=True)
        print(f"the faults predict: {spec.predicted()}", flush=True)
        stop.wait()


def iter_devices(spec: SimSpec) -> Iterator[str]:
    return (spec.device_id(i) for i in range(spec.devices))


if __name__ == "__main__":
    main()
