"""Fixtures shared by the LiteRT compiler tests: the managed tflite toolchain, created once and reused.

The toolchain lives where edgepack keeps it (``$EDGEPACK_TOOLCHAINS`` or ``~/.cache/edgepack/toolchains``),
so the suite does not rebuild it per run: when it is installed the fixture just finds it; when it is not
(a fresh CI machine) it installs it once per session — minutes — and prints how long that took.
Import the fixtures into a test module with ``from .litert_fixtures import tflite_toolchain``.
"""

from __future__ import annotations

import time

import pytest

from edgepack.compiler.toolchain import Toolchain, find_toolchain, install_toolchain


@pytest.fixture(scope="session")
def tflite_toolchain() -> Toolchain:
    pytest.importorskip("ai_edge_litert", reason="the LiteRT targets need ai-edge-litert")
    pytest.importorskip("ai_edge_quantizer", reason="the LiteRT targets need ai-edge-quantizer")
    found = find_toolchain("tflite")
    if found is not None:
        return found
    start = time.perf_counter()
    chain = install_toolchain("tflite")
    print(
        f"\n[tflite toolchain] installed {chain.spec.folder_name} in {time.perf_counter() - start:.0f} s at {chain.path}"
    )
    return chain
