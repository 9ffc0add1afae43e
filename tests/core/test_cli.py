"""The bundle CLI end to end, as a user runs it: keys, trust, bundle create, sign, verify, inspect."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def edgepack(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "edgepack", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"edgepack {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def tiny_onnx(path: Path) -> None:
    weight = numpy_helper.from_array(np.ones((4, 2), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_version_and_help():
    assert edgepack("--version").stdout.startswith("edgepack ")
    for command in (["keys", "generate"], ["trust", "init"], ["bundle", "create"], ["sign"], ["verify"], ["inspect"]):
        assert "Usage" in edgepack(*command, "--help").stdout


def test_cli_round_trip(tmp_path):
    keys = tmp_path / "keys"
    edgepack("keys", "generate", "--out", str(keys), "--name", "release")
    edgepack("keys", "generate", "--out", str(keys), "--name", "ops")
    assert stat.S_IMODE((keys / "release.key").stat().st_mode) == 0o600
    refused = edgepack("keys", "generate", "--out", str(keys), "--name", "release", check=False)
    assert refused.returncode == 1 and "already exists" in refused.stderr

    trust = tmp_path / "trust"
    edgepack(
        "trust",
        "init",
        str(trust),
        "--key",
        str(keys / "release.pub"),
        "--key",
        str(keys / "ops.pub"),
        "--threshold",
        "bundle=2",
    )

    tiny_onnx(tmp_path / "tiny.onnx")
    bundle = tmp_path / "tiny.epk"
    edgepack("bundle", "create", str(tmp_path / "tiny.onnx"), "--target", "x86", "--name", "tiny", "--version", "1.2.0",
             "--key", str(keys / "release.key"), "-o", str(bundle), "--meta", 'labels=["a","b"]')  # fmt: skip

    failed = edgepack("verify", str(bundle), "--trust", str(trust), check=False)
    assert failed.returncode == 1
    assert "1 of 2 required signatures" in failed.stderr

    edgepack("sign", str(bundle), "--key", str(keys / "ops.key"))
    assert "verified tiny 1.2.0" in edgepack("verify", str(bundle), "--trust", str(trust)).stdout

    doc = json.loads(edgepack("inspect", str(bundle), "--json").stdout)
    manifest = doc["manifest"]
    assert manifest["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": ["batch", 4], "layout": None, "native_layout": None}
    ]
    assert manifest["outputs"][0]["name"] == "y"
    assert manifest["metadata"] == {"labels": ["a", "b"]}
    assert manifest["runtime"]["name"] == "onnxruntime"
    assert len(doc["signatures"]) == 2
    assert "tiny" in edgepack("inspect", str(bundle)).stdout

    ops_id = json.loads((trust / "trust.json").read_text())["signed"]["keys"]
    ops_kid = next(k for k, v in ops_id.items() if v["x-edgepack-name"] == "ops")
    edgepack("trust", "revoke", str(trust), ops_kid[:12], "--root-key", str(keys / "release.key"), "--root-key",
             str(keys / "ops.key"))  # fmt: skip
    revoked = edgepack("verify", str(bundle), "--trust", str(trust), check=False)
    assert revoked.returncode == 1 and "revoked key" in revoked.stderr


def test_cli_errors_are_one_line_not_tracebacks(tmp_path):
    result = edgepack("verify", str(tmp_path / "nope.epk"), "--trust", str(tmp_path), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (tmp_path / "x.epk").write_bytes(b"junk")
    result = edgepack("verify", str(tmp_path / "x.epk"), "--trust", str(tmp_path), check=False)
    assert result.returncode == 1 and "no trust store" in result.stderr and "Traceback" not in result.stderr
