"""The install state machine: verify → stage → switch → commit, and roll back on any failure.

In the spirit of Mender's update modules, each state is one method with one job, and the journal records
the state *before* its work starts, so after a power cut :meth:`Installer.recover` knows where an install
stopped. ``state.json`` is written only in ``commit``; until then the device's committed state is the old
one, so an install interrupted anywhere before commit comes back as the old model, and one interrupted
after comes back as the new one.

    verify   read the head; refuse another target, an older version (anti-rollback), a missing runtime;
             then verify signatures and hashes while extracting into the store (edgepack.bundle)
    stage    load with the bundle's runtime plan, warm up, run the self-test vectors on this device
    switch   point the live slot at the new model (in-flight requests finish on the old one)
    commit   persist active/previous/highest version; drop bundles nothing references
    rollback (on failure) close the staged model; if already switched, put the committed model back

Usage::

    installer = Installer(store, live, trust, device_targets={"x86"}, options=RuntimeOptions())
    installer.recover()                         # at boot: settle interrupted installs
    result = installer.install(Path("digits.epk"))   # InstallError (with the reason) when refused
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import semver

from edgepack.agent.live import LiveModel, LiveModels
from edgepack.agent.store import DeviceStore, Journal, StoreState, bundle_hash
from edgepack.bundle import extract_bundle, read_info
from edgepack.errors import BundleError, EdgepackError, InstallError, RuntimeBackendError
from edgepack.manifest import Manifest
from edgepack.runtimes.base import RuntimeOptions, get_backend
from edgepack.runtimes.tensors import numpy_dtype
from edgepack.selftest import read_vectors, run_selftest
from edgepack.trust import TrustStore, check_target, check_version_forward

log = logging.getLogger(__name__)

StateHook = Callable[[str], None]


@dataclass
class InstallResult:
    """How an install or rollback ended."""

    name: str
    version: str
    digest: str
    outcome: str  # "committed" or "rolled_back"
    reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    selftest: dict[str, Any] | None = None


class Installer:
    """Runs installs and rollbacks one at a time against a device store and its live models."""

    def __init__(
        self,
        store: DeviceStore,
        live: LiveModels,
        trust: TrustStore,
        *,
        device_targets: set[str] | None = None,
        options: RuntimeOptions | None = None,
        on_state: StateHook | None = None,
    ) -> None:
        self.store = store
        self.live = live
        self.trust = trust
        self.device_targets = device_targets
        self.options = options or RuntimeOptions()
        self.on_state = on_state or (lambda state: None)
        self._lock = threading.Lock()

    # --- public ----------------------------------------------------------------------------------

    def install(self, bundle_path: Path) -> InstallResult:
        """Install a bundle file; returns the committed result or raises InstallError with the reason."""
        with self._lock:
            try:
                head = read_info(bundle_path).manifest
            except BundleError as exc:
                raise InstallError(f"refused {bundle_path.name}: {exc}") from exc
            digest = bundle_hash(head.to_bytes())
            journal = self.store.new_journal(head.name, digest, head.version, "install")
            return self._run(journal, head, digest, lambda: self._verify(bundle_path, head, digest))

    def rollback(self, name: str) -> InstallResult:
        """Go back to the kept previous bundle of ``name`` (allowed although its version is lower)."""
        with self._lock:
            state = self.store.load_state()
            previous = state.model(name).previous
            if previous is None or not self.store.has_bundle(previous):
                raise InstallError(f"model {name!r} has no previous bundle to roll back to")
            manifest = self.store.manifest(previous)
            journal = self.store.new_journal(name, previous, manifest.version, "rollback")
            return self._run(
                journal, manifest, previous, lambda: self.store.reverify(previous, self.trust), rollback=True
            )

    def recover(self) -> list[str]:
        """Settle installs a crash interrupted; returns what was done. Call once at boot."""
        notes = []
        state = self.store.load_state()
        for journal in self.store.journals():
            if journal.finished:
                continue
            if state.model(journal.data["name"]).active == journal.data["bundle"]:
                reason = f"interrupted after its commit was persisted (during {journal.state}); it stays active"
                journal.advance("committed", reason)
            else:
                reason = f"interrupted during {journal.state} (power loss or crash); the committed model stays"
                journal.advance("rolled_back", reason)
            notes.append(f"{journal.data['name']} {journal.data['version']}: {reason}")
            log.warning("recovered %s", notes[-1])
        self.store.remove_unreferenced(state)
        return notes

    def load_committed(self) -> dict[str, str]:
        """At boot: load every model's committed bundle (falling back to its previous one); name → status."""
        state = self.store.load_state()
        status = {}
        for name, model in sorted(state.models.items()):
            for digest in (model.active, model.previous):
                if digest is None:
                    continue
                try:
                    manifest = self.store.reverify(digest, self.trust)
                    self.live.swap(name, self._load(manifest, digest))
                except EdgepackError as exc:
                    log.error("cannot load %s from %s…: %s", name, digest[:12], exc)
                    self.live.note_failure(name, str(exc))
                    continue
                status[name] = f"{manifest.version} ({'active' if digest == model.active else 'previous'})"
                break
        return status

    # --- the state machine -----------------------------------------------------------------------

    def _run(
        self, journal: Journal, head: Manifest, digest: str, verify: Callable[[], Manifest], *, rollback: bool = False
    ) -> InstallResult:
        result = InstallResult(head.name, head.version, digest, "rolled_back")
        staged: LiveModel | None = None
        switched = False
        try:
            manifest = self._step(journal, "verify", result, verify)
            staged = self._step(journal, "stage", result, lambda: self._stage(manifest, digest, result))
            self._step(journal, "switch", result, lambda: self.live.swap(manifest.name, staged))
            switched = True
            self._step(journal, "commit", result, lambda: self._commit(manifest, digest, rollback=rollback))
            self.on_state("committed")
        except EdgepackError as exc:
            result.reason = f"{journal.state} failed: {exc}"
            self._roll_back(manifest_name=head.name, staged=staged, switched=switched)
            journal.advance("rolled_back", result.reason)
            self.store.remove_unreferenced(self.store.load_state())
            self.live.note_failure(head.name, result.reason)
            raise InstallError(f"{head.name} {head.version}: {result.reason}") from exc
        result.outcome = "committed"
        journal.advance("committed")
        log.info("committed %s %s", manifest.name, manifest.version)
        return result

    def _step(self, journal: Journal, state: str, result: InstallResult, work: Callable[[], Any]) -> Any:
        journal.advance(state)
        self.on_state(state)
        start = time.perf_counter()
        value = work()
        result.timings[state] = round(time.perf_counter() - start, 4)
        return value

    def _verify(self, bundle_path: Path, head: Manifest, digest: str) -> Manifest:
        state = self.store.load_state()
        check_target(head, self.device_targets)
        check_version_forward(head, state.model(head.name).highest_version)
        self._check_runtime(head)
        if self.store.has_bundle(digest):
            return self.store.reverify(digest, self.trust)
        return extract_bundle(bundle_path, self.store.bundle_dir(digest), self.trust)

    def _stage(self, manifest: Manifest, digest: str, result: InstallResult) -> LiveModel:
        model = self._load(manifest, digest)
        try:
            if manifest.selftest is not None:
                report = run_selftest(
                    model.runtime_model,
                    self.store.bundle_dir(digest) / manifest.selftest.vectors,
                    manifest.selftest.atol,
                    manifest.selftest.rtol,
                )
                result.selftest = {"samples": report.samples, "max_abs_diff": report.max_abs_diff}
            else:
                log.warning(
                    "%s %s carries no self-test vectors; staged on a warm-up run only", manifest.name, manifest.version
                )
        except EdgepackError:
            model.runtime_model.close()
            raise
        return model

    def _commit(self, manifest: Manifest, digest: str, *, rollback: bool) -> None:
        state = self.store.load_state()
        entry = state.model(manifest.name)
        if rollback:
            entry.previous, entry.active = None, digest
        else:
            if entry.active != digest:
                entry.previous = entry.active
            entry.active = digest
            if entry.highest_version is None or manifest.semver > semver.Version.parse(entry.highest_version):
                entry.highest_version = manifest.version
        self.store.commit_state(state)
        self.store.remove_unreferenced(state)

    def _roll_back(self, *, manifest_name: str, staged: LiveModel | None, switched: bool) -> None:
        if staged is None:
            return
        if not switched:
            staged.runtime_model.close()
            return
        # switched but not committed: put the committed model back (the retired one may be closed already)
        restored = self._committed_model(manifest_name, self.store.load_state())
        self.live.swap(manifest_name, restored)

    def _committed_model(self, name: str, state: StoreState) -> LiveModel | None:
        digest = state.model(name).active
        if digest is None:
            return None
        return self._load(self.store.manifest(digest), digest)

    # --- helpers ---------------------------------------------------------------------------------

    def _load(self, manifest: Manifest, digest: str) -> LiveModel:
        backend = get_backend(manifest.runtime.name)
        runtime_model = backend.load(
            self.store.bundle_dir(digest) / manifest.model_file,
            inputs=list(manifest.inputs),
            outputs=list(manifest.outputs),
            execution=manifest.execution,
            options=self.options,
        )
        try:
            _warm_up(runtime_model, manifest, self.store.bundle_dir(digest))
        except EdgepackError:
            runtime_model.close()
            raise
        return LiveModel(manifest, digest, runtime_model)

    def _check_runtime(self, manifest: Manifest) -> None:
        backend = get_backend(manifest.runtime.name)  # RuntimeNotInstalledError names the extra
        installed = backend.installed_version() or "0"
        if not manifest.runtime.admits(installed):
            raise RuntimeBackendError(
                f"{manifest.name} {manifest.version} needs {manifest.runtime.name} {manifest.runtime.version}; "
                f"this device has {installed}"
            )


def _warm_up(model: Any, manifest: Manifest, bundle_dir: Path) -> None:
    """Run one inference so the first request does not pay for lazy initialisation."""
    if manifest.selftest is not None:
        inputs, _ = read_vectors(bundle_dir / manifest.selftest.vectors)
        model.infer(inputs[0])
        return
    feeds = {}
    for spec in model.inputs:
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        feeds[spec.name] = np.zeros(shape, dtype=numpy_dtype(spec.dtype))
    model.infer(feeds)
