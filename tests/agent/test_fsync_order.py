"""Power loss, at the syscall level: nothing becomes visible under its name before it is durable.

``os._exit`` keeps the page cache, so a crash test cannot see a missing fsync; strace can. A child process
installs v2 over a committed v1 (and, separately, extracts a bundle with nested payload directories)
under ``strace -f -y``, and the trace must show, for every rename that publishes something in the state
directory (state.json, journal files, the extracted bundle directory):

- the renamed file was fsynced after it was last opened for writing and before the rename; for a
  renamed directory, every file and directory created in it was, and every directory in it (itself
  included) was fsynced after its last entry was created;
- the directory holding the new name was fsynced after the rename and before the next rename.

Renames into ``tmp/`` are deletions (a bundle moved out of ``bundles/`` before it is removed) and publish
nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgepack.agent.install import Installer
from edgepack.agent.live import LiveModels
from edgepack.agent.store import DeviceStore
from edgepack.bundle import BundleFile, write_bundle
from edgepack.manifest import RuntimeRequirement, TensorSpec
from tests.models import linear_bundle, linear_model

SYSCALLS = "fsync,fdatasync,rename,renameat,renameat2,openat,mkdir,mkdirat"

INSTALL_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from edgepack.agent.install import Installer
    from edgepack.agent.live import LiveModels
    from edgepack.agent.store import DeviceStore
    from edgepack.trust import TrustStore

    state_dir, trust_dir, bundle = sys.argv[1:4]
    installer = Installer(DeviceStore(Path(state_dir)), LiveModels(), TrustStore.load(Path(trust_dir)))
    installer.install(Path(bundle))
    """
)

EXTRACT_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from edgepack.bundle import extract_bundle
    from edgepack.trust import TrustStore

    bundle, dest, trust_dir = sys.argv[1:4]
    extract_bundle(Path(bundle), Path(dest), TrustStore.load(Path(trust_dir)))
    """
)


def _strace() -> str:
    path = shutil.which("strace")
    if path is None:
        pytest.skip("strace is not installed (scripts/test installs it with apt-get); the fsync order is unchecked")
    probe = subprocess.run([path, "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace refused?): {probe.stderr.strip()}")
    return path


@dataclass
class Call:
    index: int
    name: str
    path: str = ""  # openat/fsync/mkdir: the resolved path; rename: the source
    target: str = ""  # rename: the destination
    writes: bool = False  # openat for writing or creating
    directory: bool = False  # openat with O_DIRECTORY


_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<rest>.*)$")
_RESUMED = re.compile(r"^<\.\.\. (?P<name>\w+) resumed>(?P<tail>.*)$")
_CALL = re.compile(r"^(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+)(?:<(?P<retpath>[^>]*)>)?")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_DIRFD = re.compile(r"(?:AT_FDCWD|\d+)<([^>]*)>")
_FD = re.compile(r"^\d+<(?P<path>.*)>$")


def parse_trace(text: str, cwd: str) -> list[Call]:
    """Successful calls in completion order; ``<unfinished ...>`` / ``<... resumed>`` halves are joined."""
    pending: dict[str, str] = {}
    calls: list[Call] = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        pid, rest = match["pid"], match["rest"]
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            continue
        resumed = _RESUMED.match(rest)
        if resumed:
            rest = pending.pop(pid, f"{resumed['name']}(") + resumed["tail"]
        call = _CALL.match(rest)
        if not call:
            continue
        name, args, ret = call["name"], call["args"], int(call["ret"])
        if ret < 0:
            continue
        index = len(calls)
        if name in ("fsync", "fdatasync"):
            fd = _FD.match(args.strip())
            if fd:
                calls.append(Call(index, "fsync", os.path.normpath(fd["path"])))
        elif name == "openat" and call["retpath"]:
            calls.append(
                Call(
                    index,
                    "open",
                    os.path.normpath(call["retpath"]),
                    writes=bool(re.search(r"O_WRONLY|O_RDWR|O_CREAT", args)),
                    directory="O_DIRECTORY" in args,
                )
            )
        elif name in ("rename", "renameat", "renameat2", "mkdir", "mkdirat"):
            names = _QUOTED.findall(args)
            bases = _DIRFD.findall(args) if name.endswith(("at", "at2")) else []
            resolved = [
                os.path.normpath(os.path.join(bases[i] if i < len(bases) else cwd, p)) for i, p in enumerate(names)
            ]
            if name.startswith("rename") and len(resolved) == 2:
                calls.append(Call(index, "rename", resolved[0], resolved[1]))
            elif name.startswith("mkdir") and resolved:
                calls.append(Call(index, "mkdir", resolved[0]))
    return calls


def check_publication_order(calls: list[Call], root: str) -> list[str]:
    """Every rule of the module docstring, as a list of violations (empty when the order is right)."""
    problems = []
    renames = [c for c in calls if c.name == "rename" and _under(c.target, root)]
    for n, rename in enumerate(renames):
        if _under(rename.target, os.path.join(root, "tmp")):
            continue  # a deletion
        before = [c for c in calls if c.index < rename.index]
        is_dir = any(c.path == rename.path and (c.name == "mkdir" or c.directory) for c in before)
        if is_dir:
            created = [
                c for c in before
                if c.path != rename.path and _under(c.path, rename.path)
                and (c.name == "mkdir" or (c.name == "open" and c.writes))
            ]  # fmt: skip
            directories = {rename.path} | {c.path for c in created if c.name == "mkdir"}
            for entry in sorted({c.path for c in created} - directories):
                if not _synced_after_last_write(before, entry):
                    problems.append(f"{entry} was not fsynced before {rename.path} was renamed to {rename.target}")
            for directory in sorted(directories):
                last_entry = max((c.index for c in created if os.path.dirname(c.path) == directory), default=-1)
                if not any(c.name == "fsync" and c.path == directory and c.index > last_entry for c in before):
                    problems.append(f"directory {directory} was not fsynced after its last entry, before the rename")
        elif not _synced_after_last_write(before, rename.path):
            problems.append(f"{rename.path} was not fsynced before it was renamed to {rename.target}")
        following = renames[n + 1].index if n + 1 < len(renames) else len(calls)
        parent = os.path.dirname(rename.target)
        if not any(c.name == "fsync" and c.path == parent and rename.index < c.index < following for c in calls):
            problems.append(f"{parent} was not fsynced after {rename.target} appeared (before the next rename)")
    return problems


def _under(path: str, prefix: str) -> bool:
    return path == prefix.rstrip("/") or path.startswith(prefix.rstrip("/") + "/")


def _synced_after_last_write(calls: list[Call], path: str) -> bool:
    last_write = max(
        (c.index for c in calls if ((c.name == "open" and c.writes) or c.name == "mkdir") and c.path == path),
        default=-1,
    )
    return any(c.name == "fsync" and c.path == path and c.index > last_write for c in calls)


def _trace(strace: str, tmp_path: Path, script: str, *args: str) -> list[Call]:
    out = tmp_path / "strace.txt"
    cwd = os.path.realpath(tmp_path)
    child = subprocess.run(
        [strace, "-f", "-y", "-qq", "-s", "4096", "-o", str(out), "-e", f"trace={SYSCALLS}",
         sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-4000:]
    return parse_trace(out.read_text(errors="replace"), cwd)


def test_install_publishes_only_synced_files_and_directories(tmp_path, trust, keyring):
    strace = _strace()
    state_dir = Path(os.path.realpath(tmp_path)) / "state"
    Installer(DeviceStore(state_dir), LiveModels(), trust).install(
        linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=1.0)[0]
    )
    v2, _ = linear_bundle(tmp_path, keyring.keys["release"], version="2.0.0", scale=2.0)
    calls = _trace(strace, tmp_path, INSTALL_CHILD, str(state_dir), str(trust.directory), str(v2))

    root = str(state_dir)
    published = {c.target for c in calls if c.name == "rename" and _under(c.target, root)}
    digest = DeviceStore(state_dir).load_state().models["linear"].active
    assert os.path.join(root, "state.json") in published
    assert any(os.path.dirname(p) == os.path.join(root, "journal") for p in published)
    assert os.path.join(root, "bundles", digest) in published  # the extracted bundle directory
    assert check_publication_order(calls, root) == []


def test_extracting_nested_payload_syncs_every_entry_and_directory(tmp_path, trust, keyring):
    strace = _strace()
    src = tmp_path / "src"
    (src / "weights" / "deep").mkdir(parents=True)
    linear_model(src / "model.onnx", 1.0)
    (src / "weights" / "a.bin").write_bytes(b"a" * 1000)
    (src / "weights" / "deep" / "b.bin").write_bytes(b"b" * 3000)
    bundle = tmp_path / "nested.epk"
    write_bundle(
        bundle,
        files=[
            BundleFile("model.onnx", src / "model.onnx", "model"),
            BundleFile("weights/a.bin", src / "weights" / "a.bin", "weights"),
            BundleFile("weights/deep/b.bin", src / "weights" / "deep" / "b.bin", "weights"),
        ],
        signers=[keyring.keys["release"]],
        name="nested",
        version="1.0.0",
        target="x86",
        runtime=RuntimeRequirement(name="onnxruntime", version=">=1"),
        model_file="model.onnx",
        inputs=[TensorSpec(name="x", dtype="float32", shape=[1, 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[1, 4])],
    )
    dest = Path(os.path.realpath(tmp_path)) / "store" / "bundles" / "nested"
    calls = _trace(strace, tmp_path, EXTRACT_CHILD, str(bundle), str(dest), str(trust.directory))

    assert (dest / "weights" / "deep" / "b.bin").read_bytes() == b"b" * 3000
    root = str(dest.parent.parent)
    assert [c.target for c in calls if c.name == "rename" and _under(c.target, root)] == [str(dest)]
    synced = {c.path for c in calls if c.name == "fsync"}
    assert {str(dest.parent), str(dest.parent.parent)} <= synced  # the directories ensure_dir created
    assert check_publication_order(calls, root) == []


def test_the_checker_catches_a_missing_fsync():
    """The rules themselves can fail: a trace of a rename with no fsync of the staged directory."""
    trace = textwrap.dedent(
        """\
        10 mkdir("/s/bundles/.x.staging", 0700) = 0
        10 openat(AT_FDCWD</s>, "/s/bundles/.x.staging/m", O_WRONLY|O_CREAT|O_EXCL, 0666) = 3</s/bundles/.x.staging/m>
        10 fsync(3</s/bundles/.x.staging/m> <unfinished ...>
        11 openat(AT_FDCWD</s>, "/etc/hosts", O_RDONLY) = 4</etc/hosts>
        10 <... fsync resumed>) = 0
        10 rename("/s/bundles/.x.staging", "/s/bundles/x") = 0
        10 openat(AT_FDCWD</s>, "/s/bundles", O_RDONLY|O_DIRECTORY) = 3</s/bundles>
        10 fsync(3</s/bundles>) = 0
        10 renameat2(AT_FDCWD</s>, ".state.json.tmp", AT_FDCWD</s>, "state.json", 0) = 0
        """
    )
    problems = check_publication_order(parse_trace(trace, "/s"), "/s")
    assert problems == [
        "directory /s/bundles/.x.staging was not fsynced after its last entry, before the rename",
        "/s/.state.json.tmp was not fsynced before it was renamed to /s/state.json",
        "/s was not fsynced after /s/state.json appeared (before the next rename)",
    ]
