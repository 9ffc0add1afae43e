"""``edgepack fleet rollback --group SEL --model NAME [--to VERSION]``: signed rollbacks to chosen devices.

A device can only go back to the previous bundle it keeps (the agent's one exception to "versions only go
forward"), so ``--to VERSION`` picks the devices whose kept previous version is VERSION and skips the
others, saying why. Each device gets its own signed rollback command on ``devices/ID/cmd``; the result
comes from its own events; the retained command is cleared once it has answered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

from edgepack.fleet import commands
from edgepack.fleet.deploy import Deployer
from edgepack.fleet.registry import records
from edgepack.fleet.selectors import Selector
from edgepack.keys import SigningKey
from edgepack.mqtt import MqttOptions
from edgepack.protocol import DEFAULT_COMMAND_TTL, Topics


@dataclass
class RollbackOutcome:
    device: str
    outcome: str  # committed, rolled_back, failed, rejected, timeout, offline, skipped
    from_version: str | None
    to_version: str | None
    reason: str | None = None


def rollback(
    options: MqttOptions, *, selector: Selector, model: str, keys: list[SigningKey], to_version: str | None = None,
    prefix: str = "edgepack", timeout: float = 120.0, ttl: timedelta = DEFAULT_COMMAND_TTL,
    connect_timeout: float = 10.0,
) -> list[RollbackOutcome]:  # fmt: skip
    topics = Topics(prefix)
    outcomes: list[RollbackOutcome] = []
    with Deployer(options, topics, connect_timeout=connect_timeout) as deployer:
        deployer.sync()
        sent = {}
        for record in records(deployer, selector):
            status = record.models.get(model)
            active = status.get("active") if status else None
            previous = status.get("previous") if status else None
            skip = None
            if status is None:
                skip = f"does not run {model}"
            elif not previous:
                skip = f"keeps no previous version of {model}"
            elif to_version is not None and previous != to_version:
                skip = f"its previous version is {previous}, not {to_version}"
            if skip:
                outcomes.append(RollbackOutcome(record.device, "skipped", active, previous, skip))
                continue
            signed = commands.rollback(model, record.device, keys, ttl)
            deployer.send(signed, timeout=None)
            sent[record.device] = (signed.command.id, active, previous)
        deadline = time.monotonic() + timeout
        for device, (command_id, active, previous) in sent.items():
            result = deployer.wait(command_id, [device], max(0.1, deadline - time.monotonic()), offline_grace=10.0)
            progress = result[device]
            reason = progress.reason if progress.outcome != "committed" else f"back on {progress.version}"
            outcomes.append(RollbackOutcome(device, progress.outcome or "timeout", active, previous, reason))
            deployer.retract(command_id, topics.device_command(device))
        deployer.client.wait_published([deployer.client.publish(deployer._sync_topic, b"x")], 10)
    return sorted(outcomes, key=lambda o: o.device)
