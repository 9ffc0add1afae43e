"""agent/factory.py: an empty store installs the image's factory bundles at first boot, through the Installer."""

from __future__ import annotations

import logging

import numpy as np

from edgepack.agent.config import load_config
from edgepack.agent.factory import factory_bundles, install_factory_bundles
from edgepack.agent.service import DeviceAgent
from tests.models import linear_bundle, linear_reference

X = np.ones((2, 4), dtype=np.float32)


def _agent(tmp_path, trust) -> DeviceAgent:
    overrides = {"state_dir": str(tmp_path / "state"), "trust_dir": str(trust.directory), "targets": ["x86"]}
    agent = DeviceAgent(load_config(None, overrides))
    agent.boot()
    return agent


def _served(agent: DeviceAgent, name: str = "linear") -> tuple[str, np.ndarray]:
    with agent.live.acquire(name) as model:
        return model.version, model.infer({"x": X})["y"]


def test_empty_store_installs_the_factory_bundle(tmp_path, trust, keyring):
    factory = tmp_path / "factory"
    factory.mkdir()
    bundle, _ = linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=2.0)
    bundle.rename(factory / "linear.epk")
    agent = _agent(tmp_path, trust)
    try:
        results = install_factory_bundles(agent, factory)
        assert [(r.name, r.version, r.outcome) for r in results] == [("linear", "1.0.0", "committed")]
        assert results[0].selftest["samples"] == 4  # the device ran the bundle's self-test
        version, y = _served(agent)
        assert version == "1.0.0"
        np.testing.assert_allclose(y, linear_reference(X, 2.0), rtol=1e-5)
    finally:
        agent.close()
    again = _agent(tmp_path, trust)  # the next boot serves from the store; the factory bundle is not used again
    try:
        assert install_factory_bundles(again, factory) == []
        assert _served(again)[0] == "1.0.0"
    finally:
        again.close()


def test_a_store_with_models_ignores_factory_bundles(tmp_path, trust, keyring):
    agent = _agent(tmp_path, trust)
    try:
        agent.install(linear_bundle(tmp_path, keyring.keys["release"], version="2.0.0", scale=3.0)[0])
        factory = tmp_path / "factory"
        factory.mkdir()
        linear_bundle(tmp_path, keyring.keys["release"], name="other", version="1.0.0")[0].rename(factory / "o.epk")
        assert install_factory_bundles(agent, factory) == []
        assert set(agent.store.load_state().models) == {"linear"}
    finally:
        agent.close()


def test_a_refused_factory_bundle_is_skipped_and_the_next_installed(tmp_path, trust, keyring, caplog):
    factory = tmp_path / "factory"
    factory.mkdir()
    key = keyring.keys["release"]
    linear_bundle(tmp_path, keyring.keys["stranger"], name="a-untrusted")[0].rename(factory / "a.epk")
    linear_bundle(tmp_path, key, name="b-badselftest", selftest_scale=5.0)[0].rename(factory / "b.epk")
    linear_bundle(tmp_path, key, name="c-good")[0].rename(factory / "c.epk")
    agent = _agent(tmp_path, trust)
    try:
        with caplog.at_level(logging.ERROR, logger="edgepack.agent.factory"):
            results = install_factory_bundles(agent, factory)
        assert [r.name for r in results] == ["c-good"]
        assert "factory bundle a.epk refused" in caplog.text and "factory bundle b.epk refused" in caplog.text
        assert set(agent.store.load_state().models) == {"c-good"}
    finally:
        agent.close()


def test_no_factory_folder_is_nothing_to_do(tmp_path, trust):
    assert factory_bundles(tmp_path / "missing") == []
    agent = _agent(tmp_path, trust)
    try:
        assert install_factory_bundles(agent, tmp_path / "missing") == []
    finally:
        agent.close()
