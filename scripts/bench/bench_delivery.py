"""Benchmark: delivering a 50 MB bundle over MQTT to 1 and to 20 devices, against mosquitto_pub, in one run;
and the cost of resuming a transfer cut by killing the agent.

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
Resume cost (``resume_cost``, in the runner's section): one agent process under ``--max-rate`` is killed
(SIGKILL) once the operator sees half the bundle held, then started again on the same state directory; the
bytes it fetches after the restart are set against the bytes missing on disk, and its time from spawn to
``downloaded`` against a fresh agent fetching a bundle the size of the missing part, in the same run.
Writes scripts/bench/results/delivery.json and delivery.md, and delivery_resume.json/.md.

    .venv/bin/python scripts/bench/bench_delivery.py [--size-mb 50] [--devices 1 20] [--repeats 5] [--resume-rate 10M]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from results import write_results  # noqa: E402

from edgepack.agent.receiver import ChunkReceiver  # noqa: E402
from edgepack.bundle import BundleFile, write_bundle  # noqa: E402
from edgepack.fleet.commands import install_command  # noqa: E402
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


def make_bundle(root: Path, key: SigningKey, size_mb: float, version: str) -> Path:
    """A real, signed linear-model bundle padded with incompressible bytes to about ``size_mb``."""
    src = root / f"src-{version}"
    src.mkdir(parents=True)
    linear_model(src / "model.onnx", 1.0)
    x = np.ones((1, 4), dtype=np.float32)
    write_vectors(src / "selftest.npz", [{"x": x}], [{"y": linear_reference(x, 1.0)}])
    (src / "weights.bin").write_bytes(os.urandom(int(size_mb * MB)))
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
        self.held: dict[str, int] = {}  # bytes each device reported holding, last seen
        self._lock = threading.Lock()

    def device(self, progress: DeviceProgress) -> None:
        now = time.perf_counter() - self.started
        with self._lock:
            self.held[progress.device] = progress.held_bytes
            if progress.phase in ("downloaded", "verify", "stage", "switch", "commit", "done"):
                self.delivered.setdefault(progress.device, now)
            if progress.outcome:
                self.committed.setdefault(progress.device, now)
                self.outcomes[progress.device] = progress.outcome


def start_devices(broker: Mosquitto, root: Path, trust: Path, prefix: str, count: int,
                  extra: tuple[str, ...] = (), first: int = 0) -> list[subprocess.Popen]:  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(first, first + count):
        device = f"dev-{i:02d}"
        log = open(root / f"{device}.log", "ab")  # noqa: SIM115 - the child owns it
        args = ["--device-id", device, "--broker", broker.url, "--prefix", prefix, "--state", str(root / device),
                "--trust", str(trust), "--target", "x86", "--listen", f"127.0.0.1:{free_port()}",
                "--label", "group=bench", "--threads", "1", *extra]  # fmt: skip
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
    command = install_command(chunked, new_command_fields(to))
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


@contextlib.contextmanager
def _signed_broker(binary: str, prefix: str) -> Iterator[tuple[Path, SigningKey, Path, Mosquitto]]:
    """A scratch folder with a release key, a trust store that trusts it and a running mosquitto (stopped
    and removed on the way out): what both delivery measurements stand on."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp)
        key = SigningKey.generate()
        key.save(root / "keys", "release")
        trust = TrustStore.init(root / "trust", [root / "keys" / "release.pub"]).directory
        broker = Mosquitto(binary, root / "mosquitto")
        broker.start()
        try:
            yield root, key, trust, broker
        finally:
            broker.stop()


MISSING = "needs mosquitto and mosquitto-clients (apt-get install mosquitto mosquitto-clients)"


def measure(args: Settings) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows (one per device count) and the notes on how they were measured."""
    binary = find_mosquitto()
    if binary is None or shutil.which("mosquitto_pub") is None:
        raise RuntimeError(MISSING)

    with _signed_broker(binary, "edgepack-bench-delivery-") as (root, key, trust, broker):
        rows = []
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
                    runs.append(ours(broker, root, key, bundle, count, args.chunk_kib * 1024, prefix, deployer, clock))
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
RESUME_TITLE = "Resume cost: a transfer cut at ~50 % (agent killed) and resumed, against a clean transfer"


def _install(chunked: Any, device: str) -> InstallCommand:
    return install_command(chunked, new_command_fields(CommandTarget(device=device)))


def _downloaded_after(clock: Clock, deployer: Deployer, command_id: str, device: str, started: float) -> tuple:
    """Seconds from ``started`` (an agent process spawned) to the device's downloaded event, and its result."""
    result = deployer.wait(command_id, [device], 300)[device]
    if result.outcome != "committed":
        raise RuntimeError(f"deploy failed on {device}: {result.outcome} {result.reason}")
    return clock.delivered[device] + clock.started - started, result


def resume_cost(size_mb: float, rate: str, chunk_kib: int, repeats: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Kill the agent at ~50 % of a transfer (SIGKILL), restart it, and set beside it a clean transfer of the
    remaining bytes; each side from spawning the agent process to its ``downloaded`` event."""
    binary = find_mosquitto()
    if binary is None:
        raise RuntimeError(MISSING)
    rows: list[dict[str, Any]] = []
    with _signed_broker(binary, "edgepack-bench-resume-") as (root, key, trust, broker):
        clock = Clock()
        deployer = Deployer(MqttOptions(url=broker.url, client_id="bench-resume-op", protocol="auto"),
                            Topics("resume"), clock)  # fmt: skip
        deployer.connect()
        extra = ("--max-rate", rate)
        procs: list[subprocess.Popen] = []
        try:
            for run in range(repeats):
                cut, fresh = 2 * run, 2 * run + 1  # device numbers: the interrupted one, the clean one
                cut_id = f"dev-{cut:02d}"
                procs += start_devices(broker, root, trust, "resume", 1, extra, first=cut)
                wait_online(deployer, len([p for p in procs if p.poll() is None]))
                chunked = chunk_bundle(make_bundle(root, key, size_mb, f"2.0.{run}"), chunk_kib * 1024)
                size = chunked.index.size
                deployer.publish_bundle(chunked)
                command = _install(chunked, cut_id)
                clock.started = time.perf_counter()
                deployer.send(sign_command(command, [key]))
                deadline = time.monotonic() + 300
                while clock.held.get(cut_id, 0) < 0.5 * size:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the transfer never reached 50 %")
                    time.sleep(0.02)
                procs[-1].kill()
                procs[-1].wait(10)
                held = ChunkReceiver(root / cut_id / "incoming").open(chunked.index)
                on_disk = held.held_bytes
                held.close()
                missing = size - on_disk

                # the clean transfer of the remaining bytes: a fresh device, a bundle of that size
                clean = chunk_bundle(make_bundle(root, key, missing / MB, f"3.0.{run}"), chunk_kib * 1024)
                deployer.publish_bundle(clean)
                clean_cmd = _install(clean, f"dev-{fresh:02d}")
                deployer.send(sign_command(clean_cmd, [key]))
                clock.started = spawned = time.perf_counter()
                procs += start_devices(broker, root, trust, "resume", 1, extra, first=fresh)
                clean_s, _ = _downloaded_after(clock, deployer, clean_cmd.id, f"dev-{fresh:02d}", spawned)

                clock.started = spawned = time.perf_counter()
                procs += start_devices(broker, root, trust, "resume", 1, extra, first=cut)
                resumed_s, result = _downloaded_after(clock, deployer, command.id, cut_id, spawned)
                counters = result.transfer or {}
                fetched = counters.get("received_bytes", 0) + counters.get("duplicate_bytes", 0)
                rows.append({
                    "bundle MB": round(size / MB, 2), "cut at %": round(100 * on_disk / size, 1),
                    "missing MB": round(missing / MB, 3), "fetched after restart MB": round(fetched / MB, 3),
                    "re-fetched beyond missing KB": round((fetched - missing) / 1e3, 1),
                    "fetched / missing": round(fetched / missing, 3),
                    "resume s (spawn → downloaded)": round(resumed_s, 3),
                    "clean s, remaining bytes (spawn → downloaded)": round(clean_s, 3),
                    "resume / clean time": round(resumed_s / clean_s, 2),
                })  # fmt: skip
                print(rows[-1], flush=True)
        finally:
            deployer.close()
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(30)
    notes = [
        f"One `edgepack agent run` process at --max-rate {rate} (so the cut lands near 50 %), {chunk_kib} KiB "
        "chunks; killed with SIGKILL once the operator saw half the bytes held, then started again on the same "
        "state directory: it resumes the pending command by itself. Beside it, in the same run, a fresh agent "
        "fetches a bundle the size of the missing part at the same rate. Both times run from spawning the agent "
        "process to its `downloaded` event (boot, connect, fetch, whole-file check); the resumed side also "
        "re-checks the chunks it holds. Bytes from the agent's own transfer counters (received + duplicate "
        "after the restart) against what was missing on disk.",
    ]
    return rows, notes


def bench(quick: bool) -> dict[str, Any]:
    settings = Settings(size_mb=5, devices=[1, 3], repeats=2) if quick else Settings()
    try:
        rows, notes = measure(settings)
    except RuntimeError as exc:
        if str(exc) != MISSING:
            raise
        return {"title": "Delivery: bundle transfer against mosquitto_pub", "error": MISSING}
    size_mb, rate, resume_repeats = (8, "2M", 1) if quick else (50, "10M", 3)
    resume_rows, resume_notes = resume_cost(size_mb, rate, settings.chunk_kib, resume_repeats)
    fetched = statistics.median(r["fetched / missing"] for r in resume_rows)
    slower = statistics.median(r["resume / clean time"] for r in resume_rows)
    return {
        "title": "Delivery: bundle transfer against mosquitto_pub",
        "method": (
            f"a {settings.size_mb} MB signed bundle to {', '.join(map(str, settings.devices))} device(s) over one "
            f"local mosquitto, {settings.repeats} interleaved runs (median) of raw `mosquitto_pub` (one message) "
            f"and edgepack's chunked delivery ({settings.chunk_kib} KiB chunks); resume cost: a {size_mb} MB transfer "
            f"at {rate}B/s cut at ~50 % by killing the agent, {resume_repeats} run(s), against a clean transfer of "
            "the remaining bytes in the same run"
        ),
        "ratios": [
            {
                "what": f"edgepack MB/s / raw mosquitto_pub MB/s, {r['devices']} device(s)",
                "value": r["ratio edgepack/raw"],
                "goal": ">= 0.5" if r["devices"] == 1 else "(context)",
                "met": r["ratio edgepack/raw"] >= 0.5 if r["devices"] == 1 else None,
            }
            for r in rows
        ]
        + [
            {
                "what": "bytes fetched after the restart / bytes missing on disk (resume)",
                "value": fetched,
                "goal": "≈ 1 (at most one chunk more)",
                "met": fetched - 1 <= settings.chunk_kib * 1024 / (size_mb * MB),
            },
            {
                "what": "resume time after restart / clean transfer of the remaining bytes",
                "value": slower,
                "goal": "(context)",
                "met": None,
            },
        ],
        "tables": [{"title": TITLE, "rows": rows}, {"title": RESUME_TITLE, "rows": resume_rows}],
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
        "notes": [*notes, *resume_notes],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-kib", type=int, default=256)
    parser.add_argument("--resume-rate", default="10M", help="--max-rate of the resume runs; '' skips them")
    args = parser.parse_args()
    try:
        rows, notes = measure(Settings(args.size_mb, args.devices, args.repeats, args.chunk_kib))
    except RuntimeError as exc:
        sys.exit(str(exc))
    print(write_results("delivery", rows, title=TITLE, notes=notes))
    if args.resume_rate:
        rows, notes = resume_cost(args.size_mb, args.resume_rate, args.chunk_kib, args.repeats)
        print(write_results("delivery_resume", rows, title=RESUME_TITLE, notes=notes))


if __name__ == "__main__":
    main()
