"""Bundle delivery over a real mosquitto, on MQTT 3.1.1 and 5: one device, a group, resume after a broker restart,
a device that was offline when the command went out, and the `edgepack deploy` command line."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from edgepack.fleet.deploy import Deployer, deploy
from tests.models import linear_reference
from tests.mqtt.helpers import LinkOptions, options, padded_bundle, start_agent

pytestmark = pytest.mark.mqtt

X = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)


def test_deploy_to_one_agent(tmp_path, broker, protocol, topics, events, keyring, trust):
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix, protocol=protocol)
    try:
        assert device.link.client.wait_connected(10)
        bundle = padded_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=2.0, pad=20_000)
        report = deploy(
            bundle, options=options(broker.url, protocol), keys=[keyring.keys["release"]], device="cam-1",
            prefix=topics.prefix, wait=True, timeout=30, chunk_size=1024,
        )  # fmt: skip
        result = report.devices["cam-1"]
        assert report.ok, result
        assert result.version == "1.0.0"
        np.testing.assert_allclose(device.infer(X), linear_reference(X, 2.0), rtol=1e-5)
        size = bundle.stat().st_size
        assert result.transfer == {
            "resumed_bytes": 0,
            "received_bytes": size,
            "duplicate_bytes": 0,
            "rejected_bytes": 0,
        }
        assert device.link.client.protocol == protocol
        # the retained state says what the device runs, and that it is online
        state = events.wait_for_state("cam-1", lambda s: "linear" in s.models)
        assert state.online and state.models["linear"].active == "1.0.0" and state.protocol == protocol
        # phases reported on the way
        phases = [e.phase for e in events.of("progress", report.command_id)]
        assert {"index", "download", "downloaded", "verify", "stage", "commit"} <= set(phases)
    finally:
        device.stop()
    # stopping cleanly publishes the offline state
    assert events.wait_for_state("cam-1", lambda s: not s.online).models["linear"].active == "1.0.0"


def test_deploy_to_a_group_of_three(tmp_path, broker, protocol, topics, events, keyring, trust):
    agents = [
        start_agent(tmp_path, trust.directory, broker.url, device=f"cam-{i}", prefix=topics.prefix, protocol=protocol,
                    labels={"group": "cams" if i < 3 else "other", "site": "plant-3"})
        for i in range(4)
    ]  # fmt: skip
    try:
        for a in agents:
            assert a.link.client.wait_connected(10)
        bundle = padded_bundle(tmp_path, keyring.keys["release"], version="1.2.0", scale=3.0, pad=8_000)
        report = deploy(
            bundle, options=options(broker.url, protocol), keys=[keyring.keys["release"]], group="cams",
            prefix=topics.prefix, wait=True, timeout=30, chunk_size=1024,
        )  # fmt: skip
        assert sorted(report.devices) == ["cam-0", "cam-1", "cam-2"], report.devices
        assert report.ok, report.devices
        for a in agents[:3]:
            np.testing.assert_allclose(a.infer(X), linear_reference(X, 3.0), rtol=1e-5)
        assert agents[3].serving() is None  # not in the group
    finally:
        for a in agents:
            a.stop()


def test_resume_after_broker_restart(tmp_path, broker, protocol, topics, events, keyring, trust):
    chunk = 32 * 1024
    slow = LinkOptions(stall_s=0.5, need_max_s=2.0, progress_interval_s=0.05, reconnect_min_s=1, reconnect_max_s=1,
                       max_rate=1_000_000, receive_maximum=4)  # fmt: skip
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix,
                         protocol=protocol, link_options=slow)  # fmt: skip
    try:
        assert device.link.client.wait_connected(10)
        bundle = padded_bundle(tmp_path, keyring.keys["release"], version="1.0.0", pad=2_000_000)
        size = bundle.stat().st_size
        outcome = {}

        def operator() -> None:
            outcome["report"] = deploy(
                bundle, options=options(broker.url, protocol), keys=[keyring.keys["release"]], device="cam-1",
                prefix=topics.prefix, wait=True, timeout=60, chunk_size=chunk,
            )  # fmt: skip

        thread = threading.Thread(target=operator)
        thread.start()
        events.wait_for(lambda e: e.kind == "progress" and e.phase == "download" and e.held_bytes > 0.3 * size,
                        what="30% downloaded")  # fmt: skip
        broker.restart(downtime=0.3)
        thread.join(60)
        report = outcome["report"]
        assert report.ok, report.devices
        counters = report.devices["cam-1"].transfer
        assert counters["resumed_bytes"] == 0 and counters["received_bytes"] == size
        assert counters["duplicate_bytes"] <= chunk  # at most one chunk re-sent per interruption
        assert device.link.receiver.counters.duplicate_bytes <= chunk
        assert device.link.client.connects >= 2
        online = [m for m in events.raw if m.topic == topics.state("cam-1") and b'"online":true' in m.payload]
        assert len(online) >= 2, "the state is published again after reconnecting"
        assert events.of("need", report.command_id), "the restarted broker lost its retained chunks: a need is due"
        np.testing.assert_allclose(device.infer(X), linear_reference(X, 1.0), rtol=1e-5)
    finally:
        device.stop()


def test_a_bundle_server_answers_needs_after_the_deploy_is_gone(
    tmp_path, broker, protocol, topics, events, keyring, trust
):
    """deploy without --wait leaves at once; the broker then restarts and loses every retained chunk. A
    separate `serve-bundles` process (here: serve_bundles in a thread) answers the device's needs."""
    from edgepack.fleet.deploy import serve_bundles

    chunk = 32 * 1024
    slow = LinkOptions(stall_s=0.5, need_max_s=2.0, progress_interval_s=0.05, reconnect_min_s=1, reconnect_max_s=1,
                       max_rate=1_000_000, receive_maximum=4)  # fmt: skip
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-2", prefix=topics.prefix,
                         protocol=protocol, link_options=slow)  # fmt: skip
    bundle = padded_bundle(tmp_path, keyring.keys["release"], version="3.0.0", pad=2_000_000)
    size = bundle.stat().st_size
    stop = threading.Event()
    server = threading.Thread(
        target=serve_bundles,
        args=([bundle],),
        kwargs={"options": options(broker.url, protocol, "server"), "prefix": topics.prefix, "chunk_size": chunk,
                "stop": stop},
    )  # fmt: skip
    try:
        assert device.link.client.wait_connected(10)
        report = deploy(
            bundle, options=options(broker.url, protocol), keys=[keyring.keys["release"]], device="cam-2",
            prefix=topics.prefix, chunk_size=chunk,
        )  # fmt: skip
        events.wait_for(lambda e: e.kind == "progress" and e.phase == "download" and e.held_bytes > 0.3 * size,
                        what="30% downloaded")  # fmt: skip
        server.start()
        broker.restart(downtime=0.3)  # retained index, chunks and command are gone
        result = events.wait_for(lambda e: e.kind == "result" and e.command_id == report.command_id, timeout=60,
                                 what="the install result")  # fmt: skip
        assert result.outcome == "committed", result
        assert events.of("need", report.command_id), "the restarted broker lost its retained chunks: a need is due"
        assert device.serving() == "3.0.0"
    finally:
        stop.set()
        if server.is_alive():
            server.join(10)
        device.stop()


def _retained(url: str, protocol: str, topics: list[str], settle_s: float = 1.0) -> dict[str, int]:
    """topic -> payload size of the retained messages a fresh subscriber gets on ``topics``."""
    import time

    from edgepack.mqtt import MqttClient

    got: dict[str, int] = {}
    client = MqttClient(options(url, protocol, "peek"), on_message=lambda m: got.__setitem__(m.topic, len(m.payload)))
    client.subscribe(topics)
    client.connect(10)
    time.sleep(settle_s)
    client.stop()
    return {t: n for t, n in got.items() if n}


def test_clear_bundles_removes_retained_messages_but_spares_shared_chunks(tmp_path, broker, protocol, topics, keyring):
    from typer.testing import CliRunner

    from edgepack.cli import app
    from edgepack.transfer import chunk_bundle

    first = padded_bundle(tmp_path / "a", keyring.keys["release"], version="1.0.0", pad=6000)
    second = padded_bundle(tmp_path / "b", keyring.keys["release"], version="2.0.0", scale=2.0, pad=6000)
    with Deployer(options(broker.url, protocol), topics) as operator:
        for bundle in (first, second):
            operator.publish_bundle(chunk_bundle(bundle, 1024))
    a, b = chunk_bundle(first, 1024), chunk_bundle(second, 1024)
    shared = {r.sha256 for r in a.index.chunks} & {r.sha256 for r in b.index.chunks}
    assert shared, "the two bundles share chunks (their padding), which --keep must spare"
    a_topics = [topics.index(a.bundle), *(topics.chunk(r.sha256) for r in a.index.chunks)]
    assert set(_retained(broker.url, protocol, a_topics)) == set(a_topics)

    result = CliRunner().invoke(
        app,
        ["clear-bundles", str(first), "--keep", str(second), "--broker", broker.url, "--prefix", topics.prefix,
         "--chunk-size", "1k", "--protocol", protocol],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    left = _retained(broker.url, protocol, a_topics)
    assert set(left) == {topics.chunk(h) for h in shared}, "only the chunks the kept bundle shares stay"
    b_topics = [topics.index(b.bundle), *(topics.chunk(r.sha256) for r in b.index.chunks)]
    assert set(_retained(broker.url, protocol, b_topics)) == set(b_topics), "the kept bundle is whole"


def test_cli_deploy_waits_for_the_result(tmp_path, broker, topics, keyring, trust):
    from typer.testing import CliRunner

    from edgepack.cli import app

    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-7", prefix=topics.prefix, protocol="5")
    try:
        bundle = padded_bundle(tmp_path, keyring.keys["release"], version="2.0.0", pad=3000)
        common = ["deploy", str(bundle), "--device", "cam-7", "--broker", broker.url, "--prefix", topics.prefix,
                  "--chunk-size", "1k", "--wait", "--timeout", "30"]  # fmt: skip
        result = CliRunner().invoke(app, [*common, "--key", str(keyring.private("release")), "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["devices"]["cam-7"]["outcome"] == "committed" and report["to"] == "device cam-7"
        # a key the device's trust store does not hold: the command is refused, and the CLI exits 1
        refused = CliRunner().invoke(app, [*common, "--key", str(keyring.private("stranger"))])
        assert refused.exit_code == 1 and "rejected" in refused.stdout, refused.output
    finally:
        device.stop()


def test_a_device_offline_at_deploy_time_gets_it_when_it_comes_back(tmp_path, broker, protocol, topics, keyring, trust):
    bundle = padded_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=5.0, pad=4000)
    report = deploy(
        bundle, options=options(broker.url, protocol), keys=[keyring.keys["release"]], device="cam-3",
        prefix=topics.prefix, wait=False, chunk_size=1024,
    )  # fmt: skip
    operator = Deployer(options(broker.url, protocol), topics)
    operator.connect()
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-3", prefix=topics.prefix, protocol=protocol)
    try:
        result = operator.wait(report.command_id, ["cam-3"], 30)["cam-3"]
        assert result.outcome == "committed", result
        np.testing.assert_allclose(device.infer(X), linear_reference(X, 5.0), rtol=1e-5)
    finally:
        operator.close()
        device.stop()
