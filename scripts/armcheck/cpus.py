"""The emulated ARM CPUs: qemu-user itself, the CPU models it offers, and the /proc/cpuinfo each one needs.

qemu-user 7.2 shows the guest the host's x86 ``/proc/cpuinfo``; XNNPACK's CPU detection (the cpuinfo
library) then crashes in ``allocate_tensors``, and with no ``/proc`` at all XNNPACK is skipped or crashes
too. qemu looks every absolute path up under its ``-L`` root first, so an ARM-format file at
``ROOT/proc/cpuinfo`` fixes both. Its ``Features`` line is what this CPU model really offers under qemu
(decoded from ``AT_HWCAP``, which qemu sets from ``-cpu``; glibc's ``LD_SHOW_AUXV`` prints it) and its
``CPU implementer``/``CPU part`` are the model's MIDR fields, from which XNNPACK picks its
microarchitecture-tuned kernels (the Cortex-A53 ones, for instance).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from armcheck import ArmCheckError

log = logging.getLogger(__name__)

DEFAULT_CPUS = ("cortex-a53", "neoverse-n1")


@dataclass(frozen=True)
class CpuModel:
    """A ``qemu-aarch64 -cpu`` model and the MIDR fields a real chip of that kind reports."""

    name: str
    implementer: int
    part: int
    variant: int
    revision: int
    like: str  # the device class it stands for, for the report


MODELS: dict[str, CpuModel] = {
    m.name: m
    for m in (
        CpuModel("cortex-a35", 0x41, 0xD04, 0x0, 2, "low-end Cortex-A35 boards"),
        CpuModel("cortex-a53", 0x41, 0xD03, 0x0, 4, "Raspberry Pi 3 / Zero 2 (no dotprod, no fp16)"),
        CpuModel("cortex-a57", 0x41, 0xD07, 0x1, 1, "Jetson TX1/Nano class"),
        CpuModel("cortex-a72", 0x41, 0xD08, 0x0, 3, "Raspberry Pi 4"),
        CpuModel("cortex-a76", 0x41, 0xD0B, 0x4, 1, "Raspberry Pi 5"),
        CpuModel("neoverse-n1", 0x41, 0xD0C, 0x3, 1, "Raspberry Pi 5 / Graviton2 class (dotprod, fp16)"),
        CpuModel("a64fx", 0x46, 0x001, 0x1, 0, "Fujitsu A64FX (SVE)"),
    )
}

# Linux arch/arm64 hwcap names, by bit (AT_HWCAP, then AT_HWCAP2), in the order /proc/cpuinfo lists them.
# fmt: off
HWCAP_NAMES = (
    "fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp", "cpuid",
    "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512", "sve", "asimdfhm",
    "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg",
)
HWCAP2_NAMES = (
    "dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint", "svei8mm",
    "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte", "ecv", "afp", "rpres", "mte3",
    "sme", "sme_i16i64", "sme_f64f64", "sme_i8i32", "sme_f16f32", "sme_b16f32", "sme_f32f32", "sme_fa64", "wfxt",
    "ebf16", "sve_ebf16",
)
# fmt: on

_AUXV_RE = re.compile(r"^(AT_HWCAP2?):\s+(?:0x)?([0-9a-fA-F]+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Emulator:
    """qemu-user for aarch64: how to start a guest program on one CPU model under one root."""

    binary: Path
    version: str

    @classmethod
    def find(cls) -> Emulator:
        found = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
        if found is None:
            raise ArmCheckError(
                "qemu-aarch64-static is not installed: apt-get install qemu-user-static "
                "(binfmt registration is not needed; arm-check calls qemu directly)"
            )
        out = subprocess.run([found, "--version"], capture_output=True, text=True, check=False).stdout
        match = re.search(r"version (\S+)", out)
        return cls(Path(found), match.group(1) if match else "unknown")

    def argv(self, cpu: str, root: Path, program: Path, *args: str) -> list[str]:
        return [str(self.binary), "-cpu", cpu, "-L", str(root), str(program), *args]


def model(name: str) -> CpuModel:
    """The CPU model called ``name``; ArmCheckError lists the known ones otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ArmCheckError(f"unknown CPU model {name!r}; arm-check knows {', '.join(MODELS)}") from None


def probe_features(emulator: Emulator, cpu: str, root: Path, python: Path) -> list[str]:
    """The hwcap names qemu gives a guest on ``cpu``: glibc's loader prints the auxiliary vector."""
    argv = emulator.argv(cpu, root, python, "-S", "-c", "")
    env = {"LD_SHOW_AUXV": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    values = {m.group(1): int(m.group(2), 16) for m in _AUXV_RE.finditer(done.stdout)}
    if done.returncode != 0 or "AT_HWCAP" not in values:
        raise ArmCheckError(
            f"could not start the rootfs Python under {emulator.binary.name} -cpu {cpu} "
            f"(exit {done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}"
        )
    return decode_hwcaps(values["AT_HWCAP"], values.get("AT_HWCAP2", 0))


def decode_hwcaps(hwcap: int, hwcap2: int = 0) -> list[str]:
    names = [name for bit, name in enumerate(HWCAP_NAMES) if hwcap >> bit & 1]
    names += [name for bit, name in enumerate(HWCAP2_NAMES) if hwcap2 >> bit & 1]
    return names


def cpuinfo_text(cpu: CpuModel, features: list[str], processors: int) -> str:
    """An arm64 Linux ``/proc/cpuinfo`` for ``processors`` identical cores of ``cpu``."""
    block = (
        "BogoMIPS\t: 50.00\n"
        f"Features\t: {' '.join(features)}\n"
        f"CPU implementer\t: 0x{cpu.implementer:02x}\n"
        "CPU architecture: 8\n"
        f"CPU variant\t: 0x{cpu.variant:x}\n"
        f"CPU part\t: 0x{cpu.part:03x}\n"
        f"CPU revision\t: {cpu.revision}\n\n"
    )
    return "".join(f"processor\t: {i}\n{block}" for i in range(processors))


def host_processors() -> int:
    """How many CPUs the guest sees in /sys (qemu passes the host's through): the cpuinfo must list as many."""
    try:
        count = 0
        for span in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
            first, _, last = span.partition("-")
            count += int(last or first) - int(first) + 1
        return count
    except (OSError, ValueError):
        return os.cpu_count() or 1
