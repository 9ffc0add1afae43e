"""Fixtures shared by the whole suite: keys, trust stores and small bundles built on the fly."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgepack.bundle import BundleFile, write_bundle
from edgepack.keys import SigningKey
from edgepack.manifest import Manifest, RuntimeRequirement, TensorSpec
from edgepack.trust import TrustStore

REPO = Path(__file__).resolve().parents[1]


@dataclass
class KeyRing:
    directory: Path
    keys: dict[str, SigningKey]

    def private(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def public(self, name: str) -> Path:
        return self.directory / f"{name}.pub"


@pytest.fixture(autouse=True)
def _fleet_journal_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Operator commands draw their ``seq`` from the fleet journal: keep each test's in its tmp_path."""
    if "EDGEPACK_FLEET_JOURNAL" not in os.environ:
        monkeypatch.setenv("EDGEPACK_FLEET_JOURNAL", str(tmp_path / "fleet.sqlite"))


@pytest.fixture
def keyring(tmp_path: Path) -> KeyRing:
    """Three signing keys saved as files: release, second, stranger."""
    directory = tmp_path / "keys"
    keys = {}
    for name in ("release", "second", "stranger"):
        key = SigningKey.generate()
        key.save(directory, name)
        keys[name] = key
    return KeyRing(directory, keys)


@pytest.fixture
def trust(tmp_path: Path, keyring: KeyRing) -> TrustStore:
    """A trust store trusting 'release' and 'second', 1-of-2."""
    return TrustStore.init(tmp_path / "trust", [keyring.public("release"), keyring.public("second")], threshold=1)


BundleFactory = Callable[..., tuple[Path, Manifest]]


@pytest.fixture
def make_bundle(tmp_path: Path, keyring: KeyRing) -> BundleFactory:
    """Build a small signed bundle with two payload files; keyword arguments override manifest fields."""
    counter = iter(range(10_000))

    def factory(
        *, signers: tuple[str, ...] = ("release",), payload: bytes = b"onnx-bytes" * 300, **fields
    ) -> tuple[Path, Manifest]:
        n = next(counter)
        src = tmp_path / f"src{n}"
        src.mkdir()
        (src / "model.onnx").write_bytes(payload)
        (src / "labels.txt").write_text("zero\none\n")
        out = tmp_path / f"bundle{n}.epk"
        args = {
            "name": "digits",
            "version": "1.0.0",
            "target": "x86",
            "runtime": RuntimeRequirement(name="onnxruntime", version=">=1.18"),
            "model_file": "model.onnx",
            "inputs": [TensorSpec(name="input", dtype="float32", shape=["batch", 1, 8, 8])],
            "outputs": [TensorSpec(name="logits", dtype="float32", shape=["batch", 10])],
            "metadata": {"labels": ["zero", "one"]},
        }
        args.update(fields)
        manifest = write_bundle(
            out,
            files=[BundleFile("model.onnx", src / "model.onnx", "model"), BundleFile("labels.txt", src / "labels.txt")],
            signers=[keyring.keys[s] for s in signers],
            **args,
        )
        return out, manifest

    return factory
