"""A result the broker never acknowledged is sent again after a restart: a committed install is never lost
to the operator because the agent died (or the broker went away) between finishing the job and the ack."""

from __future__ import annotations

import time

import pytest

from edgepack.agent.link import CommandBook
from edgepack.agent.link.book import COMMANDS_FILE
from edgepack.fleet.deploy import Deployer
from edgepack.protocol import CommandTarget
from edgepack.transfer import chunk_bundle
from tests.mqtt.helpers import install_command, options, padded_bundle, signed, start_agent

pytestmark = pytest.mark.mqtt


def _book(state) -> CommandBook:
    return CommandBook(state / COMMANDS_FILE)


def test_book_keeps_a_result_until_it_is_reported(tmp_path):
    book = _book(tmp_path)
    book.finish("c-1", "committed", result={"kind": "result", "command_id": "c-1", "outcome": "committed"})
    book.finish("c-2", "failed")
    assert [r["command_id"] for r in _book(tmp_path).unreported()] == ["c-1"]  # persisted
    book.reported(["c-1", "unknown"])
    again = _book(tmp_path)
    assert again.unreported() == []
    assert {d["id"]: d["outcome"] for d in again._done} == {"c-1": "committed", "c-2": "failed"}


def test_result_lost_with_the_broker_is_sent_again_after_a_restart(tmp_path, broker, protocol, topics, events,
                                                                    keyring, trust):  # fmt: skip
    device = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix, protocol=protocol)
    state = device.agent.store.root
    restarted = None
    operator = Deployer(options(broker.url, protocol), topics)
    try:
        assert device.link.client.wait_connected(10)
        chunked = chunk_bundle(padded_bundle(tmp_path, keyring.keys["release"], version="2.0.0", pad=4000), 1024)
        operator.connect()
        operator.publish_bundle(chunked)

        hook = device.agent.installer.on_state

        def broker_dies_at_commit(phase: str) -> None:
            hook(phase)
            if phase == "commit":
                broker.stop()  # the result can no longer reach the broker

        device.agent.installer.on_state = broker_dies_at_commit
        command = signed(install_command(chunked, CommandTarget(device="cam-1")), keyring.keys["release"])
        operator.send(command)
        deadline = time.monotonic() + 60
        while device.serving() != "2.0.0" or device.link.busy:
            assert time.monotonic() < deadline, "the install did not finish"
            time.sleep(0.05)
        # the agent dies before any broker took its result: nothing in memory survives
        device.link.worker.stop(5)
        device.link.client.stop()
        device.agent.close()
        device = None
        assert [r["command_id"] for r in _book(state).unreported()] == [command.command.id]
        assert not events.of("result", command.command.id)

        broker.start()
        assert events.client.wait_connected(15)
        time.sleep(0.5)  # results are not retained: let the event log resubscribe before the agent is back
        restarted = start_agent(tmp_path, trust.directory, broker.url, device="cam-1", prefix=topics.prefix,
                                protocol=protocol)  # fmt: skip
        result = events.wait_for(
            lambda e: e.kind == "result" and e.command_id == command.command.id, timeout=30, what="the result again"
        )
        assert (result.outcome, result.version) == ("committed", "2.0.0")
        assert restarted.serving() == "2.0.0"
        deadline = time.monotonic() + 10
        while restarted.link.book.unreported():  # acknowledged now: not sent a third time
            assert time.monotonic() < deadline, "the broker's acknowledgement was never recorded"
            time.sleep(0.1)
        assert len(events.of("result", command.command.id)) == 1
    finally:
        operator.close()
        for running in (device, restarted):
            if running is not None:
                running.stop()
