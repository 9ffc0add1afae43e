"""``edgepack agent trust-update FILE``: give a device a new trust root from a file.

With ``edgepack agent run`` holding ``--state``, the daemon applies it (control socket), so the process
that verifies bundles and commands uses the new root at once; otherwise this command takes the state
directory's lock (no daemon can start meanwhile) and updates ``--trust`` itself. The rules are
``TrustStore.update``'s (``edgepack/trust.py``); the file formats are in ``agent/trust_update.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from edgepack.cli.console import console


def register(agent: typer.Typer) -> None:
    @agent.command("trust-update")
    def trust_update_cmd(
        file: Path = typer.Argument(..., help="roots/N.root.json from 'edgepack trust rotate', or a 'trust' message."),
        state: Path = typer.Option(..., "--state", help="The agent's state directory."),
        trust: Path | None = typer.Option(
            None, "--trust", help="Trust store directory to update when no daemon holds --state."
        ),
    ) -> None:
        """Apply a new trust root: accepted only as version N+1 signed by N's and its own root keys."""
        result = apply_trust_file(file, state, trust)
        where = f" by the daemon (PID {result['daemon']['pid']})" if result.get("daemon") else ""
        if result["applied"]:
            console.print(f"trust root now version {result['version']} (applied {result['applied']}){where}, "
                          f"expires {result['expires']}")  # fmt: skip
        else:
            console.print(f"trust root stays at version {result['version']}: nothing newer in {file}{where}")


def apply_trust_file(file: Path, state: Path, trust: Path | None) -> dict[str, Any]:
    from edgepack.agent.control import TrustUpdateRequest, ask_daemon
    from edgepack.agent.store_lock import StoreLock
    from edgepack.agent.trust_update import apply_document, read_document
    from edgepack.errors import ConfigError, StoreLockedError
    from edgepack.trust import TrustStore

    data = read_document(file)
    request = TrustUpdateRequest(document=data.decode("utf-8", errors="replace"))
    reply = ask_daemon(state, request)
    if reply is not None:
        return reply
    if trust is None:
        raise ConfigError(f"no daemon serves {state}; give --trust (the device's trust store directory)")
    try:
        lock = StoreLock.acquire(state)
    except StoreLockedError:
        reply = ask_daemon(state, request)  # a daemon that was just starting may answer now
        if reply is not None:
            return reply
        raise
    with lock:
        return apply_document(TrustStore.load(trust), data)
