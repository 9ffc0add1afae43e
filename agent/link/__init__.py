"""The agent's MQTT link: commands in, bundles in as chunks, state and events out — never in the way of serving.

The link is optional and asynchronous: the device serves its local API from its store whatever the broker
does. A command's life, and the module that does each part:

1. **Receive** (``dispatch.py``, on paho's network thread) on ``devices/ID/cmd`` and ``groups/G/cmd`` (G
   from the labels, :func:`edgepack.protocol.groups_from_labels`): validated — JSON and schema, known
   action, recipient, signed by the trust store's ``command`` role — then the replay rules. Anything
   refused is reported as a ``rejected`` event naming the reason (code + sentence) and changes nothing.
2. **Accept** (``book.py``): :class:`CommandBook` persists the command (atomically) *before* it runs, so a
   crash resumes it and a replay of it is refused. A newer command for a model pre-empts its pending install.
3. **Run** (``jobs.py`` for the states, deadline and queue; ``worker.py`` runs them on one thread): the
   chunk index and the missing chunks (``fetch.py``: paced, asked again with ``need``, given up when nothing
   answers), then ``DeviceAgent.install`` — the same state machine as the CLI, so the API keeps serving.
4. **Report** (``events.py``: events, buffered while offline; ``state.py``: the retained state and last will).

Usage (``agent/daemon.py`` does this)::

    link = AgentLink(agent, config.link)     # LinkOptions is the [link] section, LinkSettings
    link.start()                             # resumes pending commands, connects in the background
    link.status()                            # connected, current job and its state, counters, notices
    link.stop()                              # the current job stays pending; marks the device offline
"""

from edgepack.agent.link.book import CommandBook
from edgepack.agent.link.core import AgentLink, LinkOptions
from edgepack.agent.link.jobs import JobState

__all__ = ["AgentLink", "CommandBook", "JobState", "LinkOptions"]
