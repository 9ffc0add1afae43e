"""The managed converter toolchains: where they live, how they are found, installed once, and reused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgepack.compiler import toolchain as tc
from edgepack.errors import ToolchainError

from .litert_fixtures import tflite_toolchain  # noqa: F401  (session fixture)

# A toolchain that installs offline in seconds: pip is already in every new venv.
TINY = tc.ToolchainSpec(
    name="tiny", description="test toolchain", requirements=("pip",), imports=("json",), key_packages=("pip",)
)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setitem(tc.SPECS, "tiny", TINY)
    monkeypatch.setenv(tc.ENV_ROOT, str(tmp_path / "chains"))
    return tmp_path / "chains"


def test_root_defaults_to_the_user_cache_and_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tc.ENV_ROOT, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert tc.toolchains_root() == Path.home() / ".cache" / "edgepack" / "toolchains"
    monkeypatch.setenv(tc.ENV_ROOT, "/srv/chains")
    assert tc.toolchains_root() == Path("/srv/chains")


def test_pin_hash_names_the_folder_and_changes_with_any_pin() -> None:
    assert tc.TFLITE.folder_name == f"tflite-{tc.TFLITE.pin_hash}" and len(tc.TFLITE.pin_hash) == 12
    bumped = tc.ToolchainSpec(
        name="tflite",
        description="",
        requirements=tuple(r.replace("onnx2tf==1.29.24", "onnx2tf==1.29.23") for r in tc.TFLITE.requirements),
        imports=(),
    )
    assert bumped.pin_hash != tc.TFLITE.pin_hash
    # the onnx2tf stack is pinned exactly, including TensorFlow and numpy 1.x
    pins = dict(r.split("==") for r in tc.TFLITE.requirements)
    assert pins["tensorflow"].startswith("2.") and pins["numpy"].startswith("1.") and "tf-keras" in pins


def test_unknown_toolchain_is_a_clear_error() -> None:
    with pytest.raises(ToolchainError, match="unknown toolchain 'nope'; edgepack knows: tflite"):
        tc.find_toolchain("nope")


def test_install_once_then_reuse_and_a_half_made_folder_is_not_used(tiny: Path) -> None:
    assert tc.find_toolchain("tiny") is None
    chain = tc.ensure_toolchain("tiny")
    assert chain.path == tiny / TINY.folder_name and chain.python.exists()
    marker = json.loads((chain.path / tc.MARKER).read_text())
    assert marker["requirements"] == ["pip"] and marker["install_seconds"] > 0 and "pip" in marker["versions"]
    assert (chain.path / tc.INSTALL_LOG).read_text().count("pip install") == 1

    start = time.perf_counter()
    again = tc.ensure_toolchain("tiny")
    assert again.path == chain.path and again.installed_at == chain.installed_at  # reused, not rebuilt
    assert time.perf_counter() - start < 1.0

    # a subprocess in the toolchain runs its own interpreter, with its bin/ first on PATH
    out = tiny / "probe.log"
    run = chain.run(
        ["-c", "import os, sys; print(sys.prefix); print(os.environ['PATH'].split(':')[0])"], cwd=tiny, log_path=out
    )
    assert run.returncode == 0
    assert str(chain.path) in out.read_text() and str(chain.bin_dir) in out.read_text()

    # an install killed before its marker was written is not taken for an installed toolchain
    (chain.path / tc.MARKER).unlink()
    assert tc.find_toolchain("tiny") is None
    statuses = {s.name: s for s in tc.list_toolchains()}
    assert statuses["tiny"].installed is False and statuses["tflite"].path.parent == tiny


def test_failed_install_leaves_nothing_and_says_why(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_build(spec: tc.ToolchainSpec, where: Path, on_progress: object) -> None:
        where.mkdir(parents=True)
        (where / tc.INSTALL_LOG).write_text("ERROR: No matching distribution found for tensorflow==2.19.0\n")
        tc._check_call(
            [sys.executable, "-c", "import sys; sys.exit(1)"], where / tc.INSTALL_LOG, "install the pinned packages"
        )

    monkeypatch.setattr(tc, "_build", half_build)
    with pytest.raises(ToolchainError, match="could not install the pinned packages .*No matching distribution"):
        tc.install_toolchain("tiny")
    assert not (tiny / TINY.folder_name).exists()


def test_cli_lists_toolchains_as_json(tiny: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgepack", "toolchain", "list", "--json"], capture_output=True, text=True, check=True
    )
    listed = {t["name"]: t for t in json.loads(out.stdout)}
    assert listed["tflite"]["installed"] is False  # the root is the empty test folder
    assert listed["tflite"]["path"].startswith(str(tiny))


def test_the_tflite_toolchain_is_installed_once_and_has_its_pins(tflite_toolchain: tc.Toolchain) -> None:  # noqa: F811
    pins = dict(r.split("==") for r in tc.TFLITE.requirements)
    for package in ("onnx2tf", "tensorflow", "tf-keras", "numpy", "onnx", "onnxsim"):
        assert tflite_toolchain.versions[package] == pins[package], package
    assert tflite_toolchain.install_seconds is not None
    print(f"\n[tflite toolchain] {tflite_toolchain.path}: installed in {tflite_toolchain.install_seconds:.0f} s")
    assert tc.ensure_toolchain("tflite").path == tflite_toolchain.path  # found, not rebuilt
    listed = subprocess.run(
        [sys.executable, "-m", "edgepack", "toolchain", "list", "--json"], capture_output=True, text=True, check=True
    )
    assert {t["name"]: t for t in json.loads(listed.stdout)}["tflite"]["installed"] is True
