"""The target registry and the ONNX Runtime family's plans; the `edgepack targets` table."""

from __future__ import annotations

import pytest

from edgepack.errors import ConfigError
from edgepack.targets.registry import get_target, list_targets


def test_onnxruntime_targets_and_aliases() -> None:
    names = [t.name for t in list_targets()]
    assert {"x86", "nvidia-gpu", "jetson-orin", "jetson-xavier", "jetson-nano"} <= set(names)
    assert get_target("jetson").name == "jetson-orin"
    assert get_target("JETSON").name == "jetson-orin"
    assert get_target("x86").default_precision == "int8"
    assert get_target("nvidia-gpu").default_precision == "fp16"
    assert "int8" not in get_target("jetson-nano").precisions
    assert get_target("jetson").static_shapes and not get_target("x86").static_shapes


def test_unknown_target_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown target 'toaster'.*jetson-orin"):
        get_target("toaster")


def test_tensorrt_plan_per_precision() -> None:
    target = get_target("jetson-xavier")
    digest = "ab" * 32
    fp16 = target.family.execution_plan(target, precision="fp16", model_sha256=digest)
    trt = fp16["providers"][0]
    assert trt["name"] == "TensorrtExecutionProvider"
    assert trt["options"]["trt_fp16_enable"] and not trt["options"]["trt_int8_enable"]
    assert trt["options"]["trt_max_workspace_size"] == 1 << 30
    assert trt["options"]["trt_engine_cache_path"] == "tensorrt/engines/abababababababab/{trt_version}/{gpu}"
    assert trt["options"]["trt_timing_cache_path"] == "tensorrt/timing/{trt_version}/{gpu}"
    assert [p["name"] for p in fp16["providers"][1:]] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert fp16["cache_key"]["model_sha256"] == digest
    int8 = target.family.execution_plan(target, precision="int8", model_sha256=digest)
    assert int8["providers"][0]["options"]["trt_int8_enable"] is True
    assert int8["graph_optimization_level"] == "basic"
    host = target.family.host_plan(target, precision="int8")
    assert host["providers"] == [{"name": "CPUExecutionProvider", "options": {}}]


def test_runtime_version_follows_the_opset() -> None:
    x86 = get_target("x86")
    assert x86.family.runtime_version(x86, opset=13) == ">=1.18"
    assert x86.family.runtime_version(x86, opset=22) == ">=1.21"
    nano = get_target("jetson-nano")
    assert nano.family.runtime_version(nano, opset=13) == ">=1.10"
    assert nano.family.runtime_version(nano, opset=17) == ">=1.13"


def test_targets_command_prints_the_table() -> None:
    from typer.testing import CliRunner

    from edgepack.cli import app

    result = CliRunner().invoke(app, ["targets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for word in ("x86", "jetson-orin", "jetson", "nvidia-gpu", "onnxruntime", "int8", "fp16", "TensorRT"):
        assert word in result.output
