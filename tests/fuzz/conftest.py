"""Fixtures of the fuzz tests (one key, trust store and valid bundle for the session) and the report of how
many inputs each fuzz kind tried, and how they ended, printed after the run (the counts the notes quote)."""

from __future__ import annotations

from typing import Any

import pytest

from edgepack.bundle import BundleFile, write_bundle
from edgepack.keys import SigningKey
from edgepack.manifest import RuntimeRequirement, SelfTest, TensorSpec
from edgepack.trust import TrustStore
from tests.fuzz.common import COUNTS, OUTCOMES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not COUNTS:
        return
    terminalreporter.section("fuzz inputs tried, by kind")
    for kind, n in sorted(COUNTS.items()):
        terminalreporter.write_line(f"{n:7d}  {kind}")
    terminalreporter.write_line(f"{sum(COUNTS.values()):7d}  in all")
    terminalreporter.section("fuzz outcomes")
    for kind, n in sorted(OUTCOMES.items()):
        terminalreporter.write_line(f"{n:7d}  {kind}")


class World:
    """One key, a trust store trusting it for bundles and commands, and one small valid bundle."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.key = SigningKey.generate()
        self.key.save(root / "keys", "release")
        self.trust = TrustStore.init(root / "trust", [root / "keys" / "release.pub"], threshold=1)
        src = root / "src"
        src.mkdir()
        (src / "model.onnx").write_bytes(b"onnx-bytes" * 70)
        (src / "labels.txt").write_text("zero\none\n")
        (src / "vectors.npz").write_bytes(b"npz" * 10)
        self.bundle_path = root / "valid.epk"
        self.manifest = write_bundle(
            self.bundle_path,
            files=[
                BundleFile("model.onnx", src / "model.onnx", "model"),
                BundleFile("labels.txt", src / "labels.txt"),
                BundleFile("vectors.npz", src / "vectors.npz", "selftest"),
            ],
            signers=[self.key],
            name="digits",
            version="1.0.0",
            target="x86",
            runtime=RuntimeRequirement(name="onnxruntime", version=">=1.18"),
            model_file="model.onnx",
            inputs=[TensorSpec(name="input", dtype="float32", shape=["batch", 1, 8, 8])],
            outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", 10])],
            metadata={"labels": ["zero", "one"]},
            selftest=SelfTest(vectors="vectors.npz", atol=1e-3, rtol=1e-3, samples=1),
        )
        self.bundle_bytes = self.bundle_path.read_bytes()
        self.manifest_json = self.manifest.model_dump(mode="json")


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("fuzz-world"))
