"""The agent behind its KServe v2 API, driven by tritonclient: serving, hot swaps under load, metrics."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tritonclient.http as httpclient

from edgepack.agent.config import load_config
from edgepack.agent.service import DeviceAgent
from tests.models import linear_bundle, linear_reference


@pytest.fixture
def agent(tmp_path, trust):
    config = load_config(
        None,
        {
            "state_dir": str(tmp_path / "state"),
            "trust_dir": str(trust.directory),
            "targets": ["x86"],
            "listen": "127.0.0.1:0",
        },
    )
    device = DeviceAgent(config)
    device.boot()
    handle = device.start_api()
    yield device, httpclient.InferenceServerClient(handle.url)
    device.close()


def _infer(client, x, *, binary=True):
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("y", binary_data=binary)
    return client.infer("linear", [inp], outputs=[out]).as_numpy("y")


def test_serves_installed_bundle_like_edgepack_run(agent, keyring, tmp_path, trust):
    device, client = agent
    path, _ = linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0", scale=1.0)
    device.install(path)
    assert client.is_server_live() and client.is_model_ready("linear")
    meta = client.get_model_metadata("linear")
    assert meta["versions"] == ["1.0.0"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    subprocess.run(
        [sys.executable, "-m", "edgepack", "run", str(path), "--trust", str(trust.directory), "--input", str(tmp_path / "x.npy"),
         "--output", str(tmp_path / "out.npz")],
        check=True, capture_output=True,
    )  # fmt: skip
    expected = np.load(tmp_path / "out.npz")["y"]
    np.testing.assert_allclose(expected, linear_reference(x, 1.0), rtol=1e-5)
    np.testing.assert_array_equal(_infer(client, x, binary=True), expected)
    np.testing.assert_allclose(_infer(client, x, binary=False), expected, rtol=1e-6)
    assert client.get_model_repository_index() == [
        {"name": "linear", "version": "1.0.0", "state": "READY", "reason": ""}
    ]


def test_twenty_swaps_under_load_fail_no_request(agent, keyring, tmp_path):
    device, _client = agent
    bundles = [
        linear_bundle(tmp_path, keyring.keys["release"], version=f"1.0.{i}", scale=1.0 if i % 2 == 0 else 2.0)[0]
        for i in range(21)
    ]
    device.install(bundles[0])
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    answers = {1.0: linear_reference(x, 1.0), 2.0: linear_reference(x, 2.0)}
    stop = threading.Event()
    failures: list[str] = []
    counts = {1.0: 0, 2.0: 0}
    lock = threading.Lock()

    def hammer() -> None:
        own = httpclient.InferenceServerClient(device.api_url)
        while not stop.is_set():
            try:
                y = _infer(own, x)
            except Exception as exc:  # any failure at all is what this test counts
                with lock:
                    failures.append(repr(exc))
                continue
            match = [s for s, ref in answers.items() if np.allclose(y, ref, rtol=1e-5)]
            with lock:
                if len(match) != 1:
                    failures.append(f"response matches neither model: {y}")
                else:
                    counts[match[0]] += 1

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    for path in bundles[1:]:
        device.install(path)
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert failures == []
    assert counts[1.0] > 0 and counts[2.0] > 0, counts
    metrics = device.metrics.render()[0].decode()
    assert "edgepack_model_swaps_total 20.0" in metrics
    assert 'edgepack_active_model{model="linear",version="1.0.20"} 1.0' in metrics


def test_failed_install_is_counted_and_old_model_keeps_serving(agent, keyring, tmp_path):
    device, client = agent
    device.install(linear_bundle(tmp_path, keyring.keys["release"], version="1.0.0")[0])
    bad, _ = linear_bundle(tmp_path, keyring.keys["release"], version="1.1.0", scale=2.0, selftest_scale=9.0)
    with pytest.raises(Exception, match="self-test"):
        device.install(bad)
    x = np.ones((1, 4), dtype=np.float32)
    np.testing.assert_allclose(_infer(client, x), linear_reference(x, 1.0), rtol=1e-5)
    assert "edgepack_model_rollbacks_total 1.0" in device.metrics.render()[0].decode()
    index = client.get_model_repository_index()
    assert index[0]["version"] == "1.0.0" and "self-test" in index[0]["reason"]


def test_sample_model_over_the_api_matches_edgepack_run(agent, keyring, tmp_path, trust):
    """The committed sample CNN, packed as is, answers real held-out digits over the API as `edgepack run` does."""
    from tests.conftest import REPO

    device, client = agent
    bundle = tmp_path / "digits.epk"
    subprocess.run(
        [sys.executable, "-m", "edgepack", "bundle", "create", str(REPO / "models" / "digits_cnn.onnx"), "--target", "x86",
         "--name", "digits-cnn", "--version", "1.0.0", "--key", str(keyring.private("release")), "-o", str(bundle)],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "models" / "digits_data.py"), "--out", str(tmp_path / "data")],
        check=True,
    )
    test = np.load(tmp_path / "data" / "test.npz")
    images, labels = test["input"][:32], test["labels"][:32]
    np.savez(tmp_path / "x.npz", input=images)
    subprocess.run(
        [sys.executable, "-m", "edgepack", "run", str(bundle), "--trust", str(trust.directory), "--input",
         str(tmp_path / "x.npz"), "--output", str(tmp_path / "out.npz")],
        check=True, capture_output=True,
    )  # fmt: skip
    expected = np.load(tmp_path / "out.npz")["logits"]
    device.install(bundle)
    meta = client.get_model_metadata("digits-cnn")
    assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8] and meta["outputs"][0]["name"] == "logits"
    for binary in (True, False):
        inp = httpclient.InferInput("input", list(images.shape), "FP32")
        inp.set_data_from_numpy(images, binary_data=binary)
        out = httpclient.InferRequestedOutput("logits", binary_data=binary)
        logits = client.infer("digits-cnn", [inp], outputs=[out]).as_numpy("logits")
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert (expected.argmax(axis=1) == labels).mean() > 0.95
