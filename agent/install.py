"""The install state machine: verify → stage → switch → commit, and roll back on any failure.

In the spirit of Mender's update modules, each state is one method with one job, and the journal records
the state *before* its work starts, so after a power cut :meth:`Installer.recover` knows where an install
stopped. ``state.json`` is written only in ``commit``; until then the device's committed state is the old
one, so an install interrupted anywhere before commit comes back as the old model, and one interrupted
after comes back as the new one.

    verify   verify the signatures; on the manifest they verified, refuse another target, an older version
             (anti-rollback), a missing runtime; then check every payload hash while extracting into a
             staging directory that becomes bundles/HASH only when all of it verified (edgepack.bundle)
    stage    load with the bundle's runtime plan, warm up, run the self-test vectors on this device
    switch   point the live slot at the new model (in-flight requests finish on the old one)
    commit   persist active/previous/highest version; drop bundles nothing references
    rollback (on failure) close the staged model; if already switched, put the committed model back

Any exception in any step (an ``EdgepackError``, or an ``OSError`` such as a full disk or a read-only
remount) settles the same way, by ``_settle``: ``state.json`` is read again and is the truth. If it names
the new bundle, the commit persisted before the failure and the install is committed (the result's
``reason`` says what failed afterwards); otherwise the committed model serves again, the journal is
finished as ``rolled_back`` and ``InstallError`` says which step failed and why. A journal whose outcome
could not be written is settled at the next install or boot by the same rule.

Usage::

    installer = Installer(store, live, trust, device_targets={"x86"}, options=RuntimeOptions())
    installer.recover()                         # at boot: settle interrupted installs
    result = installer.install(Path("digits.epk"))   # InstallError (with the reason) when refused
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import semver

from edgepack.agent.live import LiveModel, LiveModels
from edgepack.agent.store import DeviceStore, Journal, ModelState, StoreState, bundle_hash
from edgepack.bundle import extract_bundle, read_info
from edgepack.errors import BundleError, BundleFormatError, EdgepackError, InstallError, RuntimeBackendError
from edgepack.manifest import Manifest
from edgepack.runtimes.base import RuntimeOptions, get_backend
from edgepack.runtimes.tensors import numpy_dtype
from edgepack.selftest import read_vectors, run_selftest
from edgepack.trust import TrustStore, check_target, check_version_forward

if TYPE_CHECKING:
    from edgepack.agent.threads import ServingPlan

log = logging.getLogger(__name__)

StateHook = Callable[[str], None]


@dataclass
class _Progress:
    """How far an install got: what settling a failure has to undo."""

    step: str = "start"
    staged: LiveModel | None = None
    committing: bool = False


@dataclass
class InstallResult:
    """How an install or rollback ended."""

    name: str
    version: str
    digest: str
    outcome: str  # "committed" or "rolled_back"
    reason: str | None = None  # why it rolled back, or what failed after a commit that persisted
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
        serving: ServingPlan | None = None,
    ) -> None:
        self.serving = serving  # thread budget, per-model limits, batching (agent/threads.py); None: as loaded
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
                head = read_info(bundle_path).manifest  # unverified: names the journal, decides nothing
            except BundleError as exc:
                raise InstallError(f"refused {bundle_path.name}: {exc}") from exc
            except OSError as exc:
                raise InstallError(f"cannot read {bundle_path}: {exc.strerror or exc}") from exc
            digest = bundle_hash(head.to_bytes())
            journal = self._begin(head.name, digest, head.version, "install")
            return self._run(journal, head, digest, lambda: self._verify(bundle_path, digest))

    def rollback(self, name: str) -> InstallResult:
        """Go back to the kept previous bundle of ``name`` (allowed although its version is lower)."""
        with self._lock:
            state = self.store.load_state()
            previous = state.model(name).previous
            if previous is None or not self.store.has_bundle(previous):
                raise InstallError(f"model {name!r} has no previous bundle to roll back to")
            try:
                manifest = self.store.manifest(previous)
            except (OSError, EdgepackError) as exc:
                raise InstallError(f"model {name!r}: the kept previous bundle cannot be read ({exc})") from exc
            journal = self._begin(name, previous, manifest.version, "rollback")
            return self._run(
                journal, manifest, previous, lambda: self.store.reverify(previous, self.trust), rollback=True
            )

    def recover(self) -> list[str]:
        """Settle installs a crash interrupted; returns what was done. Call once at boot."""
        notes = self._settle_unfinished("power loss or crash")
        try:
            self.store.remove_unreferenced(self.store.load_state())
            self._prune()
        except OSError as exc:
            log.error("cannot clean the store at boot: %s", _describe(exc))
        return notes

    def load_committed(self) -> dict[str, str]:
        """At boot: load every model's committed bundle (falling back to its previous one); name → status."""
        state = self.store.load_state()
        status = {}
        for name, model in sorted(state.models.items()):
            loaded = self._load_committed_one(name, model)
            if loaded is not None:
                self.live.swap(name, loaded)
                status[name] = f"{loaded.version} ({'active' if loaded.digest == model.active else 'previous'})"
        return status

    # --- the state machine -----------------------------------------------------------------------

    def _begin(self, name: str, digest: str, version: str, action: str) -> Journal:
        """Settle what an earlier failure left unfinished, then open this transaction's journal."""
        try:
            self._settle_unfinished("an earlier failure that could not write its journal")
        except Exception as exc:
            log.warning("cannot settle earlier journals: %s", exc)
        try:
            return self.store.new_journal(name, digest, version, action)
        except OSError as exc:
            raise InstallError(
                f"{name} {version}: cannot start the {action}: cannot write its journal in {self.store.root / 'journal'}"
                f" ({_os_reason(exc)}); nothing was changed"
            ) from exc

    def _run(
        self, journal: Journal, head: Manifest, digest: str, verify: Callable[[], Manifest], *, rollback: bool = False
    ) -> InstallResult:
        result = InstallResult(head.name, head.version, digest, "rolled_back")
        progress = _Progress()
        try:
            manifest = self._step(journal, "verify", result, progress, verify)
            staged = self._step(journal, "stage", result, progress, lambda: self._stage(manifest, digest, result))
            progress.staged = staged
            self._step(journal, "switch", result, progress, lambda: self.live.swap(head.name, staged))
            progress.committing = True
            state = self._step(
                journal, "commit", result, progress, lambda: self._commit(manifest, digest, rollback=rollback)
            )
        except Exception as exc:  # any failure, not only ours (OSError: disk full, read-only remount, ...)
            return self._settle(journal, head, digest, result, progress, exc)
        journal.data["committed_state"] = state.model(head.name).to_json()
        result.outcome = "committed"
        with contextlib.suppress(Exception):
            self.on_state("committed")  # before the journal's outcome, so a crash here is an unfinished commit
        self._finish(journal, result, "committed")
        log.info("committed %s %s", head.name, head.version)
        return result

    def _step(
        self, journal: Journal, state: str, result: InstallResult, progress: _Progress, work: Callable[[], Any]
    ) -> Any:
        progress.step = state
        journal.advance(state)
        self.on_state(state)
        start = time.perf_counter()
        value = work()
        result.timings[state] = round(time.perf_counter() - start, 4)
        return value

    def _settle(
        self, journal: Journal, head: Manifest, digest: str, result: InstallResult, progress: _Progress, exc: Exception
    ) -> InstallResult:
        """A step failed: make the live slot serve what ``state.json`` names, finish the journal, tell the truth.

        The truth is what ``state.json`` on disk says, re-read now: a commit that persisted before the
        failure (the rename happened, the directory fsync then failed) is committed, and the new model
        stays; anything else is rolled back and the committed model serves again.
        """
        name, failed_in = head.name, progress.step
        cause = _describe(exc)
        try:
            state: StoreState | None = self.store.load_state()
        except Exception as read_exc:  # cannot even read the state: assume the commit did not happen
            log.error("cannot re-read the committed state after %s failed: %s", failed_in, read_exc)
            state = None
        entry = state.model(name) if state is not None else ModelState()
        committed = progress.committing and entry.active == digest
        staged, serving = progress.staged, self.live.current(name)
        notes = []
        if committed:
            result.outcome = "committed"
            result.reason = f"committed, but {failed_in} then failed: {cause}"
            journal.data["committed_state"] = entry.to_json()
        else:
            result.reason = f"{failed_in} failed: {cause}"
            try:
                notes.extend(self._unstage(name, entry, staged, serving))
            except Exception as undo_exc:  # never leave the journal open because undoing failed
                log.exception("cannot undo the switch of %s", name)
                notes.append(f"undoing the switch failed too: {_describe(undo_exc)}")
        if state is not None:
            try:
                self.store.remove_unreferenced(state)
            except Exception as clean_exc:  # leftovers are removed at the next boot
                log.warning("cannot remove unreferenced bundles now: %s", clean_exc)
        if notes:
            result.reason += "; " + "; ".join(notes)
        self._finish(journal, result, result.outcome)
        if committed:
            log.warning("%s %s: %s", name, head.version, result.reason)
            return result
        self.live.note_failure(name, result.reason)
        with contextlib.suppress(Exception):
            self.on_state("rolled_back")
        raise InstallError(f"{name} {head.version}: {result.reason}") from exc

    def _unstage(
        self, name: str, entry: ModelState, staged: LiveModel | None, serving: LiveModel | None
    ) -> list[str]:
        """Not committed: close the staged model; if it was switched in, the committed one serves again."""
        if staged is None:
            return []
        if serving is not staged:
            staged.runtime_model.close()
            return []
        restored = self._load_committed_one(name, entry)
        self.live.swap(name, restored)  # closes the staged model once its in-flight requests finish
        if restored is None:
            return ["nothing committed could be loaded, so this name serves nothing"] if entry.active else []
        return [f"the committed {restored.version} serves again"]

    def _finish(self, journal: Journal, result: InstallResult, outcome: str) -> None:
        """Write the journal's outcome; when even that fails, say so (the next install or boot settles it)."""
        try:
            journal.advance(outcome, result.reason)
        except Exception as exc:
            log.error("cannot write the outcome of %s: %s", journal.path.name, exc)
            extra = f"the journal could not be written ({_describe(exc)}); it is settled at the next install or boot"
            result.reason = f"{result.reason}; {extra}" if result.reason else extra
            return
        try:
            self._prune()
        except Exception as exc:
            log.warning("cannot prune old journals: %s", exc)

    def _prune(self) -> None:
        removed = self.store.prune_journals()
        if removed:
            log.info("pruned %d finished journals", len(removed))

    def _settle_unfinished(self, cause: str) -> list[str]:
        """Finish every journal left without an outcome: committed when state.json names its bundle."""
        notes = []
        state = self.store.load_state()
        for journal in self.store.journals():
            if journal.finished:
                continue
            entry = state.model(journal.data["name"])
            try:
                if entry.active == journal.data["bundle"]:
                    reason = f"interrupted after its commit was persisted (during {journal.state}); it stays active"
                    journal.data["committed_state"] = entry.to_json()
                    journal.advance("committed", reason)
                else:
                    reason = f"interrupted during {journal.state} ({cause}); the committed model stays"
                    journal.advance("rolled_back", reason)
            except OSError as exc:  # a read-only store must not stop the device from serving
                log.error("cannot settle %s now: %s", journal.path.name, _describe(exc))
                continue
            notes.append(f"{journal.data['name']} {journal.data['version']}: {reason}")
            log.warning("recovered %s", notes[-1])
        return notes

    def _verify(self, bundle_path: Path, digest: str) -> Manifest:
        """Verify signatures first, then decide target, anti-rollback and runtime on the *verified* manifest.

        Extraction calls :meth:`_admit` as soon as the signatures verified, before it writes any payload;
        a refused bundle leaves nothing in the store.
        """
        state = self.store.load_state()

        def admit(manifest: Manifest) -> None:
            self._admit(manifest, digest, state)

        if self.store.has_bundle(digest):
            self.trust.check_fresh("new installs")  # reverify alone lets an expired root serve what it holds
            manifest = self.store.reverify(digest, self.trust)
            admit(manifest)
            return manifest
        return extract_bundle(bundle_path, self.store.bundle_dir(digest), self.trust, check=admit)

    def _admit(self, manifest: Manifest, digest: str, state: StoreState) -> None:
        if bundle_hash(manifest.to_bytes()) != digest:
            raise BundleFormatError("the bundle file changed while it was being installed; send it again")
        check_target(manifest, self.device_targets)
        check_version_forward(manifest, state.model(manifest.name).highest_version)
        self._check_runtime(manifest)

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
        except Exception:
            model.runtime_model.close()
            raise
        return model

    def _commit(self, manifest: Manifest, digest: str, *, rollback: bool) -> StoreState:
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
        return state

    def _load_committed_one(self, name: str, model: ModelState) -> LiveModel | None:
        """Load ``name``'s active bundle, else its previous one (checked again first); None when neither loads."""
        for digest in (model.active, model.previous):
            if digest is None:
                continue
            try:
                manifest = self.store.reverify(digest, self.trust)
                # self-tested at boot too: readiness means loaded *and* self-tested on this device
                return self._stage(manifest, digest, InstallResult(name, manifest.version, digest, "committed"))
            except (EdgepackError, OSError, ValueError) as exc:
                log.error("cannot load %s from %s…: %s", name, digest[:12], exc)
                self.live.note_failure(name, str(exc))
        return None

    # --- helpers ---------------------------------------------------------------------------------

    def _load(self, manifest: Manifest, digest: str) -> LiveModel:
        backend = get_backend(manifest.runtime.name)
        options = self.serving.runtime_options(manifest.name, self.options) if self.serving else self.options
        runtime_model = backend.load(
            self.store.bundle_dir(digest) / manifest.model_file,
            inputs=list(manifest.inputs),
            outputs=list(manifest.outputs),
            execution=manifest.execution,
            options=options,
        )
        try:
            _warm_up(runtime_model, manifest, self.store.bundle_dir(digest))
        except Exception:
            runtime_model.close()
            raise
        if self.serving is not None:
            runtime_model = self.serving.wrap(manifest.name, manifest.runtime.name, runtime_model)
        return LiveModel(manifest, digest, runtime_model)

    def _check_runtime(self, manifest: Manifest) -> None:
        backend = get_backend(manifest.runtime.name)  # RuntimeNotInstalledError names the extra
        installed = backend.installed_version() or "0"
        if not manifest.runtime.admits(installed):
            raise RuntimeBackendError(
                f"{manifest.name} {manifest.version} needs {manifest.runtime.name} {manifest.runtime.version}; "
                f"this device has {installed}"
            )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, EdgepackError):
        return str(exc)
    if isinstance(exc, OSError):
        return _os_reason(exc)
    return f"{type(exc).__name__}: {exc}"


def _os_reason(exc: OSError) -> str:
    where = f" on {exc.filename}" if exc.filename else ""
    text = f"{type(exc).__name__}{where}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return text + " (free space in the state directory and try again)"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO):
        return text + " (the state directory must be on a writable, healthy file system)"
    return text


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
