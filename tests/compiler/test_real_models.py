"""The fast subset of the real-model corpus: pretrained models that PyPI packages ship, from the cache
``scripts/models/fetch_real_models.py`` fills (not in git; skipped when it is empty). The whole matrix
model × target × precision is ``scripts/bench/bench_real_models.py``.

Each compile must end with a bundle that passes the bar, and where ``auto`` did not take the target's
default precision the attempts must say why (the compile's own words), never silently."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from edgepack.bundle import verify_bundle
from edgepack.compiler.pipeline import CompileRequest, compile_model
from edgepack.targets.registry import get_target

from .conftest import REPO, Signing


def _cache_dir() -> Path:
    spec = importlib.util.spec_from_file_location(
        "fetch_real_models", REPO / "scripts" / "models" / "fetch_real_models.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fetch_real_models", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return Path(module.cache_dir())


INDEX = _cache_dir() / "models.json"


def _entry(name: str) -> dict:
    if not INDEX.exists():
        pytest.skip(f"no real-model cache at {INDEX.parent}; fill it with scripts/models/fetch_real_models.py")
    index = json.loads(INDEX.read_text())
    if name not in index or not Path(index[name]["model"]).exists():
        pytest.skip(f"{name} is not in the real-model cache; run scripts/models/fetch_real_models.py --only {name}")
    return index[name]


@pytest.mark.parametrize("name", ["ocr-cls", "vad"])
def test_a_real_model_compiles_for_x86_and_any_fallback_is_explained(
    name: str, signing: Signing, tmp_path: Path
) -> None:
    entry = _entry(name)
    shapes = {
        s.split("=", 1)[0]: [int(d) for d in s.split("=", 1)[1].split(",")] for s in entry.get("input_shapes", [])
    }
    result = compile_model(
        CompileRequest(
            model=Path(entry["model"]), target="x86", calibration=Path(entry["calibration"]),
            validation=Path(entry["validation"]), keys=[signing.key_file], output=tmp_path / f"{name}.epk",
            input_shapes=shapes,
        )
    )  # fmt: skip
    assert result.accuracy.passed
    verify_bundle(result.output, signing.trust)
    if result.precision != get_target("x86").default_precision:
        first = result.attempts[0]
        explained = first.get("rejected") or first.get("error") or (first.get("tries") and not first["passed"])
        assert explained, result.attempts
        if first.get("tries") and not first["passed"]:
            assert all("summary" in t or "error" in t for t in first["tries"]), first["tries"]
