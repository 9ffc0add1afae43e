"""Packaging: the wheel carries every subpackage, and the device-side extras stay light."""

from __future__ import annotations

import email.parser
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

SUBPACKAGES = [
    "edgepack",
    "edgepack.cli",
    "edgepack.runtimes",
    "edgepack.agent",
    "edgepack.compiler",
    "edgepack.targets",
    "edgepack.fleet",
]
SOURCE_DIRS = {"edgepack": "edgepack", "agent": "edgepack/agent", "compiler": "edgepack/compiler",
               "targets": "edgepack/targets", "fleet": "edgepack/fleet"}  # fmt: skip
COMPILER_ONLY = {"onnx", "onnxslim", "nncf", "ai-edge-quantizer", "onnx2tf", "tensorflow", "torch"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("edgepack-*.whl")
    return built


def test_wheel_holds_every_source_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for source_dir, package_dir in SOURCE_DIRS.items():
        for py in (REPO / source_dir).rglob("*.py"):
            rel = py.relative_to(REPO / source_dir)
            assert f"{package_dir}/{rel.as_posix()}" in names, f"{py} is missing from the wheel"


def test_wheel_imports_every_subpackage_from_a_clean_target(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
    )
    code = (
        "import importlib, sys\n"
        f"for name in {SUBPACKAGES!r}:\n"
        "    mod = importlib.import_module(name)\n"
        f"    assert mod.__file__.startswith({str(target)!r}), (name, mod.__file__)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert (target / "bin" / "edgepack").exists()


def test_editable_install_imports_every_subpackage():
    code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in SUBPACKAGES)
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def _requires(wheel: Path) -> dict[str, set[str]]:
    """Requirement names per extra ('' for the base), from the wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
    result: dict[str, set[str]] = {}
    for req in meta.get_all("Requires-Dist") or []:
        spec, _, marker = req.partition(";")
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        name = re.split(r"[\s<>=!~\[;(]", spec.strip(), maxsplit=1)[0].lower()
        extras_of_self = re.search(r"\[([^\]]+)\]", spec)
        key = extra.group(1) if extra else ""
        if name == "edgepack" and extras_of_self:
            result.setdefault(key, set()).update(f"edgepack[{e.strip()}]" for e in extras_of_self.group(1).split(","))
        else:
            result.setdefault(key, set()).add(name)
    return result


def _closure(requires: dict[str, set[str]], extra: str) -> set[str]:
    names, todo = set(requires[""]), [extra]
    while todo:
        for req in requires.get(todo.pop(), set()):
            if req.startswith("edgepack["):
                todo.append(req[len("edgepack[") : -1])
            else:
                names.add(req)
    return names


@pytest.mark.parametrize("extra", ["agent-onnx", "agent-openvino", "agent-litert"])
def test_agent_extras_do_not_pull_compiler_dependencies(wheel, extra):
    requires = _requires(wheel)
    closure = _closure(requires, extra)
    assert not closure & COMPILER_ONLY, f"edgepack[{extra}] pulls {closure & COMPILER_ONLY}"
    runtimes = closure & {"onnxruntime", "openvino", "ai-edge-litert"}
    assert len(runtimes) == 1, f"edgepack[{extra}] should pull exactly one runtime, pulls {runtimes}"


def test_agent_modules_do_not_import_compiler_tooling():
    code = (
        "import sys, pkgutil, importlib, edgepack.agent\n"
        "for m in pkgutil.walk_packages(edgepack.agent.__path__, 'edgepack.agent.'):\n"
        "    importlib.import_module(m.name)\n"
        "import edgepack.runtimes.base, edgepack.bundle, edgepack.trust\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in {'onnx', 'onnxslim', 'nncf', 'torch', 'tensorflow'}"
        " or n.startswith('edgepack.compiler'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"the agent imports compiler tooling: {result.stdout}"
