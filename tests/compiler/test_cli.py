"""`edgepack compile` from the command line: progress, the accuracy table, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from edgepack.bundle import verify_bundle
from edgepack.cli import app

from .conftest import SAMPLE_MODEL, Digits, Signing


def test_compile_prints_the_accuracy_report(digits: Digits, signing: Signing, tmp_path: Path) -> None:
    out = tmp_path / "digits.epk"
    args = ["compile", str(SAMPLE_MODEL), "--target", "x86", "--calibration", str(digits.calibration)]
    args += ["--validation", str(digits.validation), "--key", str(signing.key_file), "-o", str(out)]
    args += ["--name", "digits", "--version", "1.2.3"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for fragment in ("compiled digits 1.2.3 for x86 at int8", "top-1 agree", "logits", "passed", "speed on this host"):
        assert fragment in result.output, result.output
    manifest = verify_bundle(out, signing.trust)
    assert (manifest.name, manifest.version, manifest.target) == ("digits", "1.2.3", "x86")


def test_compile_json_output(digits: Digits, signing: Signing, tmp_path: Path) -> None:
    out = tmp_path / "digits.epk"
    args = ["compile", str(SAMPLE_MODEL), "-t", "jetson", "-c", str(digits.calibration), "-k", str(signing.key_file)]
    args += ["-o", str(out), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{") :])
    assert data["precision"] == "fp16" and data["target"] == "jetson-orin"
    assert data["accuracy"]["passed"] is True
    assert data["fixed_shapes"] == {"input": [1, 1, 8, 8]}


def test_bad_calibration_exits_2_with_the_reason_and_no_file(signing: Signing, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((3, 8, 8), np.float32))
    out = tmp_path / "never.epk"
    command = [sys.executable, "-m", "edgepack", "compile", str(SAMPLE_MODEL), "-t", "x86", "-c", str(bad)]
    proc = subprocess.run(
        [*command, "-k", str(signing.key_file), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "calibration data" in proc.stderr and "input 'input'" in proc.stderr
    assert not out.exists()
