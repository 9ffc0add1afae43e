"""Benchmark: delivering a 50 MB bundle over MQTT to 1 and to 20 devices, against mosquitto_pub, in one run.

Goals (issue 5): for one device, at least 50% of the throughput of ``mosquitto_pub -f FILE`` sending the
same bytes as one message to a ``mosquitto_sub`` that counts receipt; the operator's upload time
independent of the number of devices.

Every side runs as its own process through one local mosquitto (persistence off): the operator is this
process (``edgepack.fleet.deploy.Deployer``), each device is a full ``edgepack agent run`` daemon (local
API, MQTT link, install state machine) with its own state directory. Times are taken on the operator's
clock from the devices' events:

- **delivered**: from the start of the upload to the device's ``downloaded`` event (all chunks checked
  against their hashes, on disk, assembled, whole-file hash checked) — what mosquitto_pub's time compares to;
- **committed**: to its ``result`` (verified again, extracted, self-tested, swapped in);
- **upload**: until the broker acknowledged the index and every chunk (retained, QoS 1).

Raw: ``mosquitto_sub -C 1`` subscribers (1, then 20) are started and given time to subscribe; the clock runs
from starting ``mosquitto_pub -q 1 -f FILE`` until every subscriber exited having received the message.
Writes scripts/bench/results/delivery.json and delivery.md.

    .venv/bin/python scripts/bench/bench_delivery.py [--size-mb 50] [--devices 1 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from results import write_results  # noqa: E402

from edgepack.bundle import BundleFile, write_bundle  # noqa: E402
from edgepack.fleet.deploy import Deployer, DeployObserver, DeviceProgress  # noqa: E402
from edgepack.keys import SigningKey  # noqa: E402
from edgepack.manifest import RuntimeRequirement, SelfTest, TensorSpec  # noqa: E402
from edgepack.mqtt import MqttOptions  # noqa: E402
from edgepack.protocol import CommandTarget, InstallCommand, Topics, new_command_fields, sign_command  # noqa: E402
from edgepack.selftest import write_vectors  # noqa: E402
from edgepack.transfer import chunk_bundle  # noqa: E402
from edgepack.trust import TrustStore  # noqa: E402
from tests.models import linear_model, linear_reference  # noqa: E402
from tests.mqtt.broker import Mosquitto, find_mosquitto, free_port  # noqa: E402

MB = 1_000_000


def make_bundle(root: Path, key: SigningKey, size_mb: int, version: str) -> Path:
    """A real, signed linear-model bundle padded with incompressible bytes to about ``size_mb``."""
    src = root / f"src-{version}"
    src.mkdir(parents=True)
    linear_model(src / "model.onnx", 1.0)
    x = np.ones((1, 4), dtype=np.float32)
    write_vectors(src / "selftest.npz", [{"x": x}], [{"y": linear_reference(x, 1.0)}])
    (src / "weights.bin").write_bytes(os.urandom(size_mb * MB))
    out = root / f"bench-{version}.epk"
    write_bundle(
        out,
        files=[
            BundleFile("model.onnx", src / "model.onnx", "model"),
            BundleFile("selftest.npz", src / "selftest.npz", "selftest"),
            BundleFile("weights.bin", src / "weights.bin"),
        ],
        signers=[key],
        name="bench",
        version=version,
        target="x86",
        runtime=RuntimeRequirement(name="onnxruntime", version=">=1.16"),
        model_file="model.onnx",
        inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 3])],
        selftest=SelfTest(vectors="selftest.npz", atol=1e-4, rtol=1e-4, samples=1),
        execution={"providers": [{"name": "CPUExecutionProvider", "options": {}}]},
    )
    shutil.rmtree(src)
    return out


def raw_delivery(broker: Mosquitto, path: Path, subscribers: int) -> float:
    """Seconds from starting mosquitto_pub until every mosquitto_sub received the one message."""
    topic = f"bench/raw/{uuid.uuid4().hex[:8]}"
    host, port = "127.0.0.1", str(broker.port)
    subs = [
        subprocess.Popen(
            ["mosquitto_sub", "-h", host, "-p", port, "-t", topic, "-q", "1", "-C", "1", "-N"],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(subscribers)
    ]
    time.sleep(0.5 + 0.05 * subscribers)  # let them subscribe
    started = time.perf_counter()
    subprocess.run(["mosquitto_pub", "-h", host, "-p", port, "-t", topic, "-q", "1", "-f", str(path)], check=True)
    for sub in subs:
        if sub.wait(120) != 0:
            raise RuntimeError("mosquitto_sub failed")
    return time.perf_counter() - started


class Clock(DeployObserver):
    """Operator-side times of each device's downloaded and committed events."""

    def __init__(self) -> None:
        self.started = 0.0
        self.delivered: dict[str, float] = {}
        self.committed: dict[str, float] = {}
        self.outcomes: dict[str, str] = {}
        self._lock = threading.Lock()

    def device(self, progress: DeviceProgress) -> None:
        now = time.perf_counter() - self.started
        with self._lock:
            if progress.phase in ("downloaded", "verify", "stage", "switch", "commit", "done"):
                self.delivered.setdefault(progress.device, now)
            if progress.outcome:
                self.committed.setdefault(progress.device, now)
                self.outcomes[progress.device] = progress.outcome


def start_devices(broker: Mosquitto, root: Path, trust: Path, prefix: str, count: int) -> list[subprocess.Popen]:
    root.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(count):
        device = f"dev-{i:02d}"
        log = open(root / f"{device}.log", "wb")  # noqa: SIM115 - the child owns it
        args = ["--device-id", device, "--broker", broker.url, "--prefix", prefix, "--state", str(root / device),
                "--trust", str(trust), "--target", "x86", "--listen", f"127.0.0.1:{free_port()}",
                "--label", "group=bench", "--threads", "1"]  # fmt: skip
        procs.append(
            subprocess.Popen([sys.executable, "-m", "edgepack", "agent", "run", *args], stdout=log, stderr=log)
        )
    return procs


def wait_online(deployer: Deployer, count: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deployer.sync()
        online = [s for s in deployer.states.values() if s.online]
        if len(online) >= count:
            return
        time.sleep(0.5)
    raise RuntimeError(f"only {len(online)} of {count} devices came online")


def ours(broker: Mosquitto, root: Path, key: SigningKey, bundle: Path, count: int, chunk: int, prefix: str,
         deployer: Deployer, clock: Clock) -> dict:  # fmt: skip
    chunked = chunk_bundle(bundle, chunk)
    to = CommandTarget(group="bench") if count > 1 else CommandTarget(device="dev-00")
    command = InstallCommand(
        **new_command_fields(to), action="install", model="bench", version=chunked.manifest.version,
        target="x86", bundle=chunked.bundle, size=chunked.index.size, sha256=chunked.index.sha256,
        index_sha256=chunked.index_sha256,
    )  # fmt: skip
    clock.started = time.perf_counter()
    clock.delivered.clear(), clock.committed.clear(), clock.outcomes.clear()
    upload = deployer.publish_bundle(chunked)
    deployer.send(sign_command(command, [key]))
    devices = [f"dev-{i:02d}" for i in range(count)]
    results = deployer.wait(command.id, devices, 300)
    failed = {d: (p.outcome, p.reason) for d, p in results.items() if p.outcome != "committed"}
    if failed:
        raise RuntimeError(f"deploy failed on {failed}")
    return {
        "upload": upload,
        "delivered_last": max(clock.delivered[d] for d in devices),
        "delivered_median": statistics.median(clock.delivered[d] for d in devices),
        "committed_last": max(clock.committed[d] for d in devices),
    }


@dataclass
class Settings:
    size_mb: int = 50
    devices: list[int] = field(default_factory=lambda: [1, 20])
    repeats: int = 5
    chunk_kib: int = 256


MISSING = "needs mosquitto and mosquitto-clients (apt-get install mosquitto mosquitto-clients)"


def measure(args: Settings) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows (one per device count) and the notes on how they were measured."""
    binary = find_mosquitto()
    if binary is None or shutil.which("mosquitto_pub") is None:
        raise RuntimeError(MISSING)

    with tempfile.TemporaryDirectory(prefix="edgepack-bench-delivery-") as tmp:
        root = Path(tmp)
        key = SigningKey.generate()
        key.save(root / "keys", "release")
        trust = TrustStore.init(root / "trust", [root / "keys" / "release.pub"]).directory
        broker = Mosquitto(binary, root / "mosquitto")
        broker.start()
        rows = []
        try:
            versions = iter(f"1.0.{i}" for i in range(1000))
            for count in args.devices:
                prefix = f"bench{count}"
                procs = start_devices(broker, root / f"devices-{count}", trust, prefix, count)
                clock = Clock()
                options = MqttOptions(url=broker.url, client_id=f"bench-op-{count}", protocol="auto")
                deployer = Deployer(options, Topics(prefix), clock)
                deployer.connect()
                try:
                    wait_online(deployer, count)
                    raw_times, runs = [], []
                    for _ in range(args.repeats):  # interleaved: raw, then ours, with a fresh bundle each time
                        bundle = make_bundle(root, key, args.size_mb, next(versions))
                        raw_times.append(raw_delivery(broker, bundle, count))
                        runs.append(
                            ours(broker, root, key, bundle, count, args.chunk_kib * 1024, prefix, deployer, clock)
                        )
                        bundle.unlink()
                    size = args.size_mb
                    raw_s = statistics.median(raw_times)
                    delivered = statistics.median(r["delivered_last"] for r in runs)
                    rows.append(
                        {
                            "devices": count,
                            "bundle MB": size,
                            "raw mosquitto_pub s": round(raw_s, 3),
                            "raw s (min–max)": f"{min(raw_times):.2f}–{max(raw_times):.2f}",
                            "raw MB/s (per device)": round(size / raw_s, 1),
                            "edgepack delivered s (last device)": round(delivered, 3),
                            "delivered s (min–max)": f"{min(r['delivered_last'] for r in runs):.2f}–"
                            f"{max(r['delivered_last'] for r in runs):.2f}",
                            "edgepack MB/s (per device)": round(size / delivered, 1),
                            "ratio edgepack/raw": round(raw_s / delivered, 2),
                            "aggregate MB/s": round(size * count / delivered, 1),
                            "operator upload s": round(statistics.median(r["upload"] for r in runs), 3),
                            "committed s (last device)": round(statistics.median(r["committed_last"] for r in runs), 3),
                        }
                    )
                    print(rows[-1], flush=True)
                finally:
                    deployer.close()
                    for proc in procs:
                        proc.terminate()
                    for proc in procs:
                        proc.wait(30)
                    shutil.rmtree(root / f"devices-{count}", ignore_errors=True)
        finally:
            broker.stop()

    uploads = {r["devices"]: r["operator upload s"] for r in rows}
    notes = [
        f"median of {args.repeats} interleaved runs; {args.chunk_kib} KiB chunks, QoS 1, retained; one local mosquitto "
        "(persistence off); every device a full `edgepack agent run` process (API, link, install state machine).",
        "delivered: upload start → the device's `downloaded` event (every chunk hash-checked and on disk with fsync, "
        "assembled, whole-file sha256 checked); raw: mosquitto_pub start → every mosquitto_sub got the one message.",
        "committed: → the result event (bundle verified again, extracted, self-tested, swapped in).",
        "goal 1: ratio edgepack/raw ≥ 0.5 for one device; goal 2: operator upload independent of the device count "
        f"(here {uploads}).",
        f"machine: {os.cpu_count()} cores; every process (broker, operator, devices, raw clients) shares them.",
    ]
    return rows, notes


TITLE = "Bundle delivery over MQTT vs mosquitto_pub (one message)"


def bench(quick: bool) -> dict[str, Any]:
    settings = Settings(size_mb=5, devices=[1, 3], repeats=2) if quick else Settings()
    try:
        rows, notes = measure(settings)
    except RuntimeError as exc:
        if str(exc) != MISSING:
            raise
        return {"title": "Delivery: bundle transfer against mosquitto_pub", "error": MISSING}
    return {
        "title": "Delivery: bundle transfer against mosquitto_pub",
        "method": (
            f"a {settings.size_mb} MB signed bundle to {', '.join(map(str, settings.devices))} device(s) over one "
            f"local mosquitto, {settings.repeats} interleaved runs (median) of raw `mosquitto_pub` (one message) "
            f"and edgepack's chunked delivery ({settings.chunk_kib} KiB chunks)"
        ),
        "ratios": [
            {
                "what": f"edgepack MB/s / raw mosquitto_pub MB/s, {r['devices']} device(s)",
                "value": r["ratio edgepack/raw"],
                "goal": ">= 0.5" if r["devices"] == 1 else "(context)",
                "met": r["ratio edgepack/raw"] >= 0.5 if r["devices"] == 1 else None,
            }
            for r in rows
        ],
        "tables": [{"title": TITLE, "rows": rows}],
        "plots": [
            {
                "kind": "bars",
                "file": "delivery.png",
                "title": "Time to deliver the bundle (last device, median)",
                "ylabel": "seconds",
                "groups": [f"{r['devices']} device(s)" for r in rows],
                "series": {
                    "raw mosquitto_pub": [r["raw mosquitto_pub s"] for r in rows],
                    "edgepack delivered": [r["edgepack delivered s (last device)"] for r in rows],
                    "edgepack committed": [r["committed s (last device)"] for r in rows],
                },
            }
        ],
        "notes": [*notes, "Resume cost (a transfer cut and resumed) is not measured yet."],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-kib", type=int, default=256)
    args = parser.parse_args()
    try:
        rows, notes = measure(Settings(args.size_mb, args.devices, args.repeats, args.chunk_kib))
    except RuntimeError as exc:
        sys.exit(str(exc))
    print(write_results("delivery", rows, title=TITLE, notes=notes))


if __name__ == "__main__":
    main()
