"""First boot from a factory bundle: a device image ships a model, so the device serves before it sees a broker.

A firmware image (``firmware-images/``, ``scripts/build-image --factory-bundle``) drops signed bundles in
:data:`FACTORY_DIR`. At boot, after the store's own bundles are loaded and before the API serves, the
daemon calls :func:`install_factory_bundles`: when the store holds no model at all, each ``*.epk`` there
(in name order) goes through the normal :class:`~edgepack.agent.install.Installer` — target, version and
signature checks against the image's trust root, then the self-test on this device — exactly like a
bundle that came over MQTT. Once any model is committed the factory bundles are never looked at again:
what the fleet installed later wins, and anti-rollback keeps the store from going back to them.

A factory bundle that is refused is logged and skipped: the device still boots, its API answers (with no
model), and the MQTT link can bring a good one. An install cut short by a power loss is settled by the
next boot's recovery, which leaves the store empty again, so the factory install is simply retried.

Usage::

    agent.boot()
    install_factory_bundles(agent)                 # no-op unless the store is empty
    agent.start_api()
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from edgepack.errors import EdgepackError

if TYPE_CHECKING:
    from edgepack.agent.install import InstallResult
    from edgepack.agent.service import DeviceAgent

log = logging.getLogger(__name__)

FACTORY_DIR = Path("/usr/share/edgepack/factory")


def factory_bundles(directory: Path = FACTORY_DIR) -> list[Path]:
    """The ``*.epk`` files in ``directory``, in name order; empty when it does not exist."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.epk") if p.is_file())


def install_factory_bundles(agent: DeviceAgent, directory: Path = FACTORY_DIR) -> list[InstallResult]:
    """Install the factory bundles when the store holds no model; returns the committed installs."""
    bundles = factory_bundles(directory)
    if not bundles:
        return []
    if agent.store.load_state().models:
        log.debug("store already holds models; factory bundles in %s are not used", directory)
        return []
    log.info("empty store: installing %d factory bundle(s) from %s", len(bundles), directory)
    committed = []
    for bundle in bundles:
        try:
            result = agent.install(bundle)
        except EdgepackError as exc:
            log.error("factory bundle %s refused: %s (the device serves without it)", bundle.name, exc)
            continue
        log.info("factory bundle %s: %s %s committed", bundle.name, result.name, result.version)
        committed.append(result)
    return committed
