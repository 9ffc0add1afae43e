"""The ARM proof (issue 8): LiteRT bundles run on the aarch64 runtime under qemu-user, on a Cortex-A53 (no
dotprod, no fp16) and a Neoverse-N1, give the host's outputs within their self-test tolerance with the
XNNPACK delegate in use; a bundle whose outputs are wrong fails naming the sample and the difference.

The end-to-end tests share one ``scripts/arm-check`` run (``arm_run`` in conftest.py) and skip, saying
which Debian packages to install, where qemu-user-static or mmdebstrap is missing. The unit tests below
them need neither.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.arm.conftest import ArmRun, Rpi4Bundle
from tests.arm.models import build_conv_tflite, host_outputs, sample_inputs

CPUS = ("cortex-a53", "neoverse-n1")


def _assert_passes(run: ArmRun, name: str) -> None:
    verdict = run.verdict(name)
    assert verdict["ok"], f"{name} failed under emulation:\n{run.stdout}\n{run.stderr}"
    assert verdict["host"]["ok"]
    assert [cpu["cpu"] for cpu in verdict["cpus"]] == list(CPUS)
    for cpu in verdict["cpus"]:
        checks = cpu["checks"]
        assert checks["ran"]["detail"].startswith("aarch64, litert "), checks["ran"]
        assert "delegate created" in checks["xnnpack"]["detail"]
        assert "from the host's native outputs" in checks["host"]["detail"]


# --- end to end, under qemu -----------------------------------------------------------------------


def test_float_conv_bundle_passes_on_both_emulated_cpus(arm_run: ArmRun) -> None:
    _assert_passes(arm_run, "conv-float")


def test_int8_conv_bundle_passes_on_both_emulated_cpus(arm_run: ArmRun) -> None:
    """int8 conv + FC: the A53 runs XNNPACK's non-dotprod int8 kernels, the N1 its dotprod ones."""
    _assert_passes(arm_run, "conv-int8")


def test_sample_model_rpi4_int8_bundle_passes_on_both_emulated_cpus(arm_run: ArmRun, rpi4_bundle: Rpi4Bundle) -> None:
    assert rpi4_bundle.path is not None
    _assert_passes(arm_run, "digits-rpi4")


def test_altered_vector_fails_naming_sample_and_difference(arm_run: ArmRun) -> None:
    verdict = arm_run.verdict("conv-altered")
    assert not verdict["ok"]
    assert arm_run.returncode == 1, arm_run.stderr
    for cpu in verdict["cpus"]:
        detail = cpu["checks"]["self-test"]["detail"]
        assert not cpu["checks"]["self-test"]["ok"]
        assert "sample 2, output 'logits'" in detail and "|diff| 0.5 exceeds the allowed" in detail, detail
        assert cpu["checks"]["ran"]["ok"] and cpu["checks"]["xnnpack"]["ok"]
    assert "FAIL  conv-altered" in arm_run.stdout
    assert "sample 2, output 'logits': |diff| 0.5 exceeds" in arm_run.stdout


def test_emulated_cpus_differ_as_the_chips_they_stand_for(arm_run: ArmRun) -> None:
    """The A53 has no dotprod/fp16 (Pi 3 class), the N1 has both (Pi 5 class): qemu really emulates two chips."""
    features = {cpu["cpu"]: set(cpu["features"]) for cpu in arm_run.verdict("conv-float")["cpus"]}
    assert {"asimd", "aes"} <= features["cortex-a53"]
    assert not {"asimddp", "fphp", "asimdhp"} & features["cortex-a53"]
    assert {"asimddp", "fphp", "asimdhp", "atomics"} <= features["neoverse-n1"]


def test_report_states_correctness_only(arm_run: ArmRun) -> None:
    assert "correctness only" in arm_run.stdout
    assert " s/" not in arm_run.stdout and "ms/inference" not in arm_run.stdout


# --- units: no qemu needed ------------------------------------------------------------------------


def test_conv_test_model_matches_its_numpy_reference(tmp_path) -> None:
    pytest.importorskip("ai_edge_litert")
    weights = build_conv_tflite(tmp_path / "conv.tflite")
    inputs = sample_inputs(3)
    for x, got in zip(inputs, host_outputs(tmp_path / "conv.tflite", inputs)):
        np.testing.assert_allclose(got, weights.reference(x), atol=1e-4, rtol=1e-4)


def test_int8_conv_test_model_is_close_to_the_float_one(tmp_path) -> None:
    pytest.importorskip("ai_edge_litert")
    weights = build_conv_tflite(tmp_path / "conv_int8.tflite", quantized=True)
    inputs = sample_inputs(3)
    for x, got in zip(inputs, host_outputs(tmp_path / "conv_int8.tflite", inputs)):
        np.testing.assert_allclose(got, weights.reference(x), atol=0.15)


def test_cpuinfo_is_arm_format_with_the_models_midr() -> None:
    from armcheck import cpus

    text = cpus.cpuinfo_text(cpus.model("cortex-a53"), cpus.decode_hwcaps(0x8FB), processors=2)
    blocks = text.strip().split("\n\n")
    assert len(blocks) == 2 and blocks[1].startswith("processor\t: 1\n")
    assert "Features\t: fp asimd aes pmull sha1 sha2 crc32 cpuid\n" in blocks[0]
    assert "CPU implementer\t: 0x41\n" in text and "CPU part\t: 0xd03\n" in text
    assert "asimddp" in cpus.decode_hwcaps(0x119FFB)


def test_unknown_cpu_model_is_refused_with_the_known_ones() -> None:
    from armcheck import ArmCheckError, cpus

    with pytest.raises(ArmCheckError, match="cortex-a53.*neoverse-n1"):
        cpus.model("cortex-a999")


def test_platform_tags_reach_the_rootfs_glibc() -> None:
    from armcheck import wheels

    tags = wheels.platform_tags((2, 36))
    assert tags[0] == "manylinux2014_aarch64"
    assert {"manylinux_2_17_aarch64", "manylinux_2_28_aarch64", "manylinux_2_36_aarch64"} <= set(tags)
    assert "manylinux_2_37_aarch64" not in tags


def test_wheels_of_other_versions_are_pruned(tmp_path) -> None:
    from armcheck import wheels

    names = [
        "numpy-2.3.5-cp311-cp311-manylinux_2_27_aarch64.whl",  # a pin
        "numpy-2.2.0-cp311-cp311-manylinux_2_17_aarch64.whl",  # an older version
        "ml_dtypes-0.5.1-cp311-cp311-manylinux_2_27_aarch64.whl",  # a pin, spelled with "_"
        "gone_package-1.0-py3-none-any.whl",  # no longer a dependency
    ]
    for name in [*names, "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    pins = [wheels.Pin("numpy", "2.3.5"), wheels.Pin("ml-dtypes", "0.5.1")]
    removed = wheels.prune_wheels(tmp_path, pins)
    assert sorted(p.name for p in removed) == sorted([names[1], names[3]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[0], names[2], "notes.txt"])


def test_device_pins_follow_the_host_versions_and_leave_edgepack_out() -> None:
    from importlib import metadata

    from armcheck import wheels

    requires = metadata.distribution("edgepack").requires or []
    pins = {p.name.lower().replace("_", "-"): p.version for p in wheels.device_pins(requires, ["agent-litert"], "3.11")}
    assert "edgepack" not in pins
    for name in ("numpy", "ai-edge-litert", "ml-dtypes", "cryptography", "pydantic", "pydantic-core", "typer"):
        assert pins[name] == metadata.version(name), name
    assert "onnxruntime" not in pins and "onnx" not in pins  # device side only, no compiler


def test_a_guest_that_dies_is_reported_with_the_bundle_it_died_on(tmp_path) -> None:
    """What qemu's "uncaught target signal 11" (the x86-cpuinfo trap) looks like in the verdicts."""
    import signal

    from armcheck.compare import judge
    from armcheck.run import BundleRun, Platform, PlatformRun

    bundles = [tmp_path / "a.epk", tmp_path / "b.epk"]
    log = tmp_path / "cortex-a53.log"
    log.write_text("guest: bundle 0\nqemu: uncaught target signal 11 (Segmentation fault) - core dumped\n")
    host_log = tmp_path / "host.log"
    host_log.write_text("")
    error = {"ok": False, "error": "RuntimeBackendError: no model"}

    def platform_run(label: str, code: int, log_file, runs: list[BundleRun]) -> PlatformRun:
        return PlatformRun(Platform(label, [], [], {}), code, log_file, runs)

    runs = {
        "host": platform_run("host", 0, host_log, [BundleRun(b, tmp_path, True, error) for b in bundles]),
        "cortex-a53": platform_run(
            "cortex-a53",
            -signal.SIGSEGV,
            log,
            [BundleRun(bundles[0], tmp_path, True, None), BundleRun(bundles[1], tmp_path, False, None)],
        ),
    }
    first, second = judge(runs)
    assert not first.ok and not second.ok
    ran = first.cpus[0].checks["ran"].detail
    assert "died of SIGSEGV while running this bundle" in ran and "/proc/cpuinfo" in ran
    assert "uncaught target signal 11" in ran
    assert "before reaching this bundle" in second.cpus[0].checks["ran"].detail
    assert first.host.detail.startswith("the host itself cannot run it: RuntimeBackendError")
