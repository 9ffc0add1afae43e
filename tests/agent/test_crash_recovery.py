"""Power loss at every persisted step of an install: after a restart the store is the old or the new state.

A child process installs v2 over a committed v1 and dies with os._exit (no cleanup, no flush of Python
buffers — as close to pulling the plug as a test gets) when the state machine reaches the given state.
The parent then boots a fresh agent on the same state directory.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgepack.agent.install import Installer
from edgepack.agent.live import LiveModels
from edgepack.agent.store import DeviceStore
from tests.models import linear_bundle, linear_reference

CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from edgepack.agent.install import Installer
    from edgepack.agent.live import LiveModels
    from edgepack.agent.store import DeviceStore
    from edgepack.trust import TrustStore

    state_dir, trust_dir, bundle, crash_at = sys.argv[1:5]

    def hook(state):
        if state == crash_at:
            os._exit(137)

    if crash_at == "extracting":  # die after the first payload file reached the staging directory
        import edgepack.bundle as bundle_module
        bundle_module._DirectorySink.close = staticmethod(lambda fh: os._exit(137))

    installer = Installer(DeviceStore(Path(state_dir)), LiveModels(), TrustStore.load(Path(trust_dir)), on_state=hook)
    installer.install(Path(bundle))
    os._exit(0)
    """
)

# (state the child dies in, version served after the restart)
CASES = [
    ("verify", "1.0.0"),
    ("extracting", "1.0.0"),
    ("stage", "1.0.0"),
    ("switch", "1.0.0"),
    ("commit", "1.0.0"),
    ("committed", "2.0.0"),
]


@pytest.mark.parametrize(("crash_at", "expected"), CASES)
def test_restart_after_crash_at_each_step(tmp_path, trust, keyring, crash_at, expected):
    state_dir = tmp_path / "state"
    v1 = Installer(DeviceStore(state_dir), LiveModels(), trust).install(
        linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=1.0)[0]
    )
    v2_path, _ = linear_bundle(tmp_path, keyring.keys["release"], version="2.0.0", scale=2.0)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(state_dir), str(trust.directory), str(v2_path), crash_at],
        capture_output=True,
        text=True,
    )
    assert child.returncode == 137, child.stderr

    live = LiveModels()
    store = DeviceStore(state_dir)
    rebooted = Installer(store, live, trust)
    notes = rebooted.recover()
    assert len(notes) == 1 and "interrupted" in notes[0]
    assert rebooted.load_committed() == {"linear": f"{expected} (active)"}
    with live.acquire("linear") as model:
        assert model.version == expected
        scale = 1.0 if expected == "1.0.0" else 2.0
        x = np.ones((1, 4), dtype=np.float32)
        np.testing.assert_allclose(model.infer({"x": x})["y"], linear_reference(x, scale), rtol=1e-5)
    journals = store.journals()
    assert all(j.finished for j in journals)
    assert journals[-1].data["outcome"] == ("committed" if expected == "2.0.0" else "rolled_back")
    # only referenced bundles remain; no staging leftovers
    state = store.load_state().models["linear"]
    on_disk = sorted(p.name for p in (state_dir / "bundles").iterdir())
    assert on_disk == sorted(d for d in (state.active, state.previous) if d)
    assert v1.digest in on_disk
    assert list((state_dir / "tmp").iterdir()) == []
    # the device still takes the update afterwards
    if expected == "1.0.0":
        assert rebooted.install(v2_path).outcome == "committed"
