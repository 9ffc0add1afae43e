"""Publishing new trust roots to the fleet: one retained ``trust`` message per group.

The message carries every root version the operator's store holds (``roots/N.root.json``), oldest first,
so a device that missed versions walks them in order (``TrustStore.update``). It is retained, like group
commands, so a device that is offline now takes it when it reconnects; it needs no signature of its own
(each root in it is signed by root keys, and devices accept only a valid N+1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from edgepack.errors import ConfigError
from edgepack.mqtt import MqttClient, MqttOptions
from edgepack.protocol import Topics, encode, trust_update
from edgepack.trust import TrustStore

log = logging.getLogger(__name__)


def push_trust(
    options: MqttOptions,
    store: TrustStore,
    groups: Sequence[str],
    *,
    prefix: str = "edgepack",
    since: int = 1,
    timeout: float = 30.0,
) -> list[str]:
    """Publish ``store``'s root chain (versions ``since``..N) retained on each group's trust topic."""
    if not groups:
        raise ConfigError("push the trust root to at least one group (--group NAME)")
    topics = Topics(prefix)
    payload = encode(trust_update(store.chain(since)))
    published = [topics.group_trust(g) for g in groups]
    client = MqttClient(options)
    client.connect(timeout)
    try:
        infos = [client.publish(t, payload, retain=True, content_type="application/json") for t in published]
        client.wait_published(infos, timeout)
    finally:
        client.stop()
    log.info("published trust root version %d to %s", store.version, ", ".join(published))
    return published
