"""Bad input over MQTT: each is refused and reported as an event naming the reason; the live model serves on.

One agent per protocol goes through every case in turn while a thread keeps sending inferences to its
local API; not one may fail.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import numpy as np
import pytest

from edgepack.fleet.deploy import Deployer
from edgepack.manifest import utc_now
from edgepack.protocol import CommandTarget, encode, sign_command
from edgepack.transfer import ChunkedBundle, chunk_bundle
from tests.models import linear_reference
from tests.mqtt.helpers import install_command, options, padded_bundle, signed, start_agent

pytestmark = pytest.mark.mqtt

X = np.random.default_rng(5).standard_normal((1, 4)).astype(np.float32)
ME = CommandTarget(device="cam-1")


class Inferences:
    """Inferences through the local API in a loop, counting failures."""

    def __init__(self, device) -> None:
        self.device = device
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        expected = linear_reference(X, 1.0)
        while not self._stop.is_set():
            try:
                np.testing.assert_allclose(self.device.infer(X), expected, rtol=1e-5)
                self.done += 1
            except Exception as exc:
                self.failures.append(repr(exc))
            self._stop.wait(0.02)

    def __enter__(self) -> Inferences:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_bad_input_is_rejected_and_reported_while_serving(tmp_path, broker, protocol, topics, events, keyring, trust):
    release, stranger = keyring.keys["release"], keyring.keys["stranger"]
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix,
                         protocol=protocol, labels={"group": "cams"}, disk_quota_mb=1.0)  # fmt: skip
    device.agent.install(padded_bundle(tmp_path, release, version="1.0.0"))
    operator = Deployer(options(broker.url, protocol), topics)
    operator.connect()
    try:
        _run_cases(device, operator, tmp_path, topics, events, release, stranger)
    finally:
        operator.close()
        device.stop()


def _run_cases(device, operator, tmp_path, topics, events, release, stranger) -> None:
    assert device.link.client.wait_connected(10)
    cmd_topic = topics.device_command("cam-1")

    def raw(payload: bytes, topic: str = cmd_topic) -> None:
        operator.client.wait_published([operator.client.publish(topic, payload)], 10)

    def rejected(code: str, command_id: str | None = None):
        event = events.wait_for(
            lambda e: e.kind == "rejected" and e.code == code and (command_id is None or e.command_id == command_id),
            what=f"a rejection with code {code}",
        )
        assert event.reason and event.device == "cam-1"
        return event

    def outcome(command, chunked: ChunkedBundle | None = None, *, publish: bool = True):
        if chunked is not None and publish:
            operator.publish_bundle(chunked)
        operator.send(command)
        return operator.wait(command.command.id, ["cam-1"], 20)["cam-1"]

    def bundle(version: str, **kwargs) -> ChunkedBundle:
        return chunk_bundle(padded_bundle(tmp_path, kwargs.pop("key", release), version=version, **kwargs), 512)

    with Inferences(device) as load:
        # malformed JSON, wrong schema, another protocol version
        raw(b"{not json")
        assert "not valid JSON" in rejected("malformed").reason
        raw(json.dumps({"v": 1, "command": {"action": "install"}, "signatures": []}).encode())
        assert "schema" in events.wait_for(lambda e: e.kind == "rejected" and "schema" in e.reason).reason
        raw(json.dumps({"v": 2, "command": {}}).encode())
        events.wait_for(lambda e: e.kind == "rejected" and "protocol version 2" in e.reason)

        # an unknown command
        raw(json.dumps({"v": 1, "command": {"action": "reboot"}, "signatures": []}).encode())
        assert "reboot" in rejected("unknown_command").reason

        good = bundle("1.1.0", pad=4000)
        # a command for another device on this device's topic, and a group command for another group
        other = signed(install_command(good, CommandTarget(device="cam-9")), release)
        raw(encode(other))
        assert "cam-9" in rejected("wrong_recipient", other.command.id).reason
        other_group = signed(install_command(good, CommandTarget(group="dogs")), release)
        raw(encode(other_group), topics.group_command("cams"))
        rejected("wrong_recipient", other_group.command.id)

        # unsigned, signed by an untrusted key, altered after signing
        unsigned = sign_command(install_command(good, ME), [])
        raw(encode(unsigned))
        assert "0 of 1" in rejected("untrusted", unsigned.command.id).reason
        foreign = signed(install_command(good, ME), stranger)
        raw(encode(foreign))
        assert "unknown key" in rejected("untrusted", foreign.command.id).reason
        altered = signed(install_command(good, ME), release)
        tampered = altered.model_copy(update={"command": altered.command.model_copy(update={"version": "9.9.9"})})
        raw(encode(tampered))
        rejected("signature", altered.command.id)

        # a chunk whose bytes do not match its hash: refused, asked for again, the operator answers
        operator.publish_bundle(good)
        bad_ref = good.index.chunks[3]
        operator.client.wait_published(
            [operator.client.publish(topics.chunk(bad_ref.sha256), b"x" * bad_ref.size, retain=True)], 10
        )
        command = signed(install_command(good, ME), release)
        result = outcome(command, good, publish=False)
        assert "hashes to" in rejected("chunk_mismatch").reason
        assert result.outcome == "committed" and result.version == "1.1.0", result
        assert result.transfer["rejected_bytes"] == bad_ref.size
        assert device.serving() == "1.1.0"

        # replayed (live) and older commands
        raw(encode(command))
        assert "already accepted" in rejected("replayed", command.command.id).reason
        older = signed(install_command(good, ME, seq=command.command.seq - 1), release)
        raw(encode(older))
        assert "not newer" in rejected("stale", older.command.id).reason
        expired = signed(install_command(good, ME, expires_at=utc_now() - timedelta(minutes=1)), release)
        raw(encode(expired))
        assert "expired" in rejected("stale", expired.command.id).reason

        # a chunk index that lies about sizes (pinned by a signed command: it fails the job)
        lying = bundle("1.2.0", pad=2000)
        sizes = [
            c.model_copy(update={"size": c.size + (1 if i == 0 else -1 if i == 1 else 0)})
            for i, c in enumerate(lying.index.chunks)
        ]
        liar_index = lying.index.model_copy(update={"chunks": sizes})
        liar = ChunkedBundle(lying.path, lying.manifest, liar_index, liar_index.to_bytes())
        result = outcome(signed(install_command(liar, ME), release), liar)
        assert (result.outcome, result.code) == ("failed", "index_invalid") and "lies about sizes" in result.reason

        # an index altered on the broker: refused, asked for again; then the bundle fails its self-test
        failing = bundle("1.3.0", pad=2000, selftest_scale=5.0)
        operator.publish_bundle(failing)
        command = signed(install_command(failing, ME), release)
        altered_index = b'{"v":1}'  # replaces the retained index before the device asks for it
        operator.client.wait_published(
            [operator.client.publish(topics.index(failing.bundle), altered_index, retain=True)], 10
        )
        result = outcome(command, failing, publish=False)
        assert "does not match the hash" in rejected("index_invalid", command.command.id).reason
        assert (result.outcome, result.code) == ("rolled_back", "selftest"), result

        # a bundle for another target: refused before a byte is fetched
        arm = bundle("1.4.0", pad=2000, target="arm64")
        result = outcome(signed(install_command(arm, ME), release), arm)
        assert (result.outcome, result.code) == ("failed", "target") and result.transfer is None

        # a bundle that fails verification (signed by a key the device does not trust)
        untrusted = bundle("1.5.0", pad=2000, key=stranger)
        result = outcome(signed(install_command(untrusted, ME), release), untrusted)
        assert (result.outcome, result.code) == ("rolled_back", "untrusted"), result

        # a bundle that would not fit in the disk quota: refused up front
        huge = bundle("1.6.0", pad=700_000)
        result = outcome(signed(install_command(huge, ME), release), huge, publish=False)
        assert (result.outcome, result.code) == ("failed", "quota") and "quota" in result.reason
        assert device.link.receiver.counters.received_bytes < 100_000

    assert device.serving() == "1.1.0"
    assert not load.failures and load.done > 10, load.failures[:3]
