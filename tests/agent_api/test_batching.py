"""Dynamic batching: requests gathered into one run, never across shapes, each answer to its own request
in order, a failing request isolated from its batch; and the agent batching a real onnxruntime model
behind the API.

Batches are made deterministic by long queue delays: a batch that should run at once (full, or at a
preferred size) must come back long before the delay, so a wrong batcher fails by timeout, not by luck.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edgepack.agent.api.batching import BatchingModel, BatchingPolicy
from edgepack.agent.config import ModelServingSettings, load_config
from edgepack.agent.service import DeviceAgent
from edgepack.agent.threads import ServingPlan
from edgepack.errors import ConfigError, InferenceInputError
from edgepack.manifest import TensorSpec
from edgepack.runtimes.base import LoadedModel
from tests.agent_api.test_overload import _wait_until
from tests.models import BASE_B, BASE_W, linear_bundle

LONG_US = 60_000_000  # a minute: no test waits for it


class Doubler(LoadedModel):
    """y = 2x for x [n, k]; records the shape of every call; refuses NaN like a model's input guard.
    ``hold_first``: the first call waits inside until ``gate`` is set (a batch that is running)."""

    def __init__(self, batch_dim: int | str = "n", *, hold_first: bool = False) -> None:
        self.inputs = [TensorSpec(name="x", dtype="float32", shape=[batch_dim, "k"])]
        self.outputs = [TensorSpec(name="y", dtype="float32", shape=[batch_dim, "k"])]
        self.calls: list[tuple[int, ...]] = []
        self.gate = threading.Event()
        self._hold = hold_first
        self._lock = threading.Lock()

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self._lock:
            self.calls.append(tuple(x.shape))
            hold, self._hold = self._hold, False
        if hold:
            assert self.gate.wait(30), "the test never opened the gate"
        if np.isnan(x).any():
            raise InferenceInputError("input 'x': NaN is not allowed")
        return {"y": x * 2}

    def close(self) -> None:
        pass


def _behind_a_running_batch(model: BatchingModel, inner: Doubler, arrays: list[np.ndarray]) -> list:
    """Run ``arrays[0]`` (held inside the model), queue the rest behind it, then let it finish; every result
    (an output dict or the exception) in order."""
    with ThreadPoolExecutor(len(arrays)) as pool:
        futures = [pool.submit(model.infer, {"x": arrays[0]})]
        _wait_until(lambda: len(inner.calls) == 1, "the first request inside the model")
        futures += [pool.submit(model.infer, {"x": a}) for a in arrays[1:]]
        _wait_until(lambda: model.queued == len(arrays) - 1, "the others queued")
        inner.gate.set()
        return [f.exception(timeout=30) or f.result() for f in futures]


def test_requests_are_gathered_into_one_run_and_each_gets_its_own_rows() -> None:
    inner = Doubler(hold_first=True)
    model = BatchingModel(inner, BatchingPolicy(max_batch_size=6, max_queue_delay_us=LONG_US), name="d")
    arrays = [np.full((1, 3), i, np.float32) for i in range(5)] + [np.full((2, 3), 9, np.float32)]
    results = _behind_a_running_batch(model, inner, arrays)  # 1 row alone (the model was idle), then 6
    for array, result in zip(arrays, results, strict=True):
        np.testing.assert_array_equal(result["y"], array * 2)
    assert inner.calls == [(1, 3), (6, 3)] and model.batches_run == 1 and model.rows_batched == 6
    model.close()


def test_different_shapes_are_never_mixed() -> None:
    inner = Doubler(hold_first=True)
    model = BatchingModel(inner, BatchingPolicy(max_batch_size=4, max_queue_delay_us=LONG_US), name="d")
    arrays = [np.full((1, 3), 0, np.float32)] + [np.full((1, 3 if i % 2 else 5), i, np.float32) for i in range(1, 8)]
    results = _behind_a_running_batch(model, inner, arrays)
    for array, result in zip(arrays, results, strict=True):
        np.testing.assert_array_equal(result["y"], array * 2)
    assert inner.calls == [(1, 3), (4, 3), (3, 5)]  # the oldest's shape first, the other shape on its own
    model.close()


def test_an_idle_model_runs_a_lone_request_at_once() -> None:
    inner = Doubler()
    model = BatchingModel(inner, BatchingPolicy(max_batch_size=8, max_queue_delay_us=LONG_US), name="d")
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(model.infer, {"x": np.ones((1, 2), np.float32)}).result(timeout=30)
    np.testing.assert_array_equal(result["y"], np.full((1, 2), 2.0))
    assert inner.calls == [(1, 2)]
    model.close()


def test_a_preferred_size_runs_without_waiting_for_the_delay() -> None:
    inner = Doubler(hold_first=True)
    policy = BatchingPolicy(max_batch_size=8, max_queue_delay_us=LONG_US, preferred_batch_sizes=(2,),
                            max_concurrent_batches=2)  # fmt: skip
    model = BatchingModel(inner, policy, name="d")
    with ThreadPoolExecutor(3) as pool:
        held = pool.submit(model.infer, {"x": np.zeros((1, 2), np.float32)})
        _wait_until(lambda: len(inner.calls) == 1, "the first request inside the model")
        pair = [pool.submit(model.infer, {"x": np.ones((1, 2), np.float32)}) for _ in range(2)]
        # a batch is running, so the second batcher would wait a minute for 8 rows; 2 is preferred: it goes
        assert all(np.array_equal(f.result(timeout=30)["y"], np.full((1, 2), 2.0)) for f in pair)
        inner.gate.set()
        held.result(timeout=30)
    assert inner.calls == [(1, 2), (2, 2)]
    model.close()


def test_a_failing_request_fails_alone_and_its_batch_mates_get_answers() -> None:
    inner = Doubler(hold_first=True)
    model = BatchingModel(inner, BatchingPolicy(max_batch_size=4, max_queue_delay_us=LONG_US), name="d")
    arrays = [np.full((1, 2), i, np.float32) for i in range(5)]
    arrays[3][0, 1] = np.nan
    results = _behind_a_running_batch(model, inner, arrays)
    assert isinstance(results[3], InferenceInputError) and "NaN" in str(results[3])
    for i in (0, 1, 2, 4):
        np.testing.assert_array_equal(results[i]["y"], arrays[i] * 2)
    assert inner.calls[1] == (4, 2) and len(inner.calls) == 6  # the batch, then each of its four alone
    model.close()


def test_requests_larger_than_a_batch_or_alone_run_unbatched() -> None:
    inner = Doubler()
    model = BatchingModel(inner, BatchingPolicy(max_batch_size=4, max_queue_delay_us=1_000), name="d")
    big = np.ones((5, 2), np.float32)
    np.testing.assert_array_equal(model.infer({"x": big})["y"], big * 2)
    one = np.ones((1, 2), np.float32)
    np.testing.assert_array_equal(model.infer({"x": one})["y"], one * 2)  # waits 1 ms for company, then alone
    assert inner.calls == [(5, 2), (1, 2)] and model.batches_run == 0
    model.close()
    with pytest.raises(Exception, match="closed"):
        model.infer({"x": one})


def test_models_without_a_dynamic_batch_dim_and_bad_policies_are_refused() -> None:
    with pytest.raises(ConfigError, match="no dynamic batch dimension"):
        BatchingModel(Doubler(batch_dim=1), BatchingPolicy(max_batch_size=4))
    with pytest.raises(ConfigError, match="max_batch_size"):
        BatchingPolicy(max_batch_size=1)
    with pytest.raises(ConfigError, match="preferred_batch_sizes"):
        BatchingPolicy(max_batch_size=4, preferred_batch_sizes=(8,))
    with pytest.raises(ConfigError, match=r"models\.m: .*preferred_batch_sizes \[8\]"):
        load_config(None, {"models": {"m": {"max_batch_size": 4, "preferred_batch_sizes": [8]}}})


def test_the_plan_batches_where_the_runtime_and_the_cores_allow() -> None:
    settings = {"m": ModelServingSettings(max_batch_size=4)}
    two_cores = ServingPlan(models=settings, cores=2)
    assert isinstance(two_cores.wrap("m", "onnxruntime", Doubler()), BatchingModel)
    assert two_cores.batch_threads == 4
    assert not isinstance(two_cores.wrap("m", "litert", Doubler()), BatchingModel)  # fixed shapes there
    assert not isinstance(two_cores.wrap("m", "onnxruntime", Doubler(batch_dim=1)), BatchingModel)
    one_core = ServingPlan(models=settings, cores=1)
    assert not isinstance(one_core.wrap("m", "onnxruntime", Doubler()), BatchingModel)  # off by default there
    forced = ServingPlan(models={"m": ModelServingSettings(max_batch_size=4, batching=True)}, cores=1)
    assert isinstance(forced.wrap("m", "onnxruntime", Doubler()), BatchingModel)


def test_the_agent_batches_a_real_model_behind_http_and_grpc(tmp_path: Path, keyring, trust) -> None:
    import tritonclient.grpc as grpcclient

    config = load_config(
        None,
        {
            "state_dir": str(tmp_path / "state"),
            "trust_dir": str(trust.directory),
            "listen": "127.0.0.1:0",
            "grpc_port": 0,
            "runtime.thread_budget": 2,
            "models": {"linear": {"max_batch_size": 8, "max_queue_delay_us": 200_000, "batching": True}},
        },
    )
    agent = DeviceAgent(config)
    try:
        agent.install(linear_bundle(tmp_path, keyring.keys["release"])[0])
        handle = agent.start_api()
        served = agent.live.current("linear")
        assert served is not None and isinstance(served.runtime_model, BatchingModel)
        xs = [np.full((1, 4), i, np.float32) for i in range(8)]

        def post(x: np.ndarray) -> np.ndarray:
            conn = http.client.HTTPConnection(handle.host, handle.port, timeout=30)
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x.ravel().tolist()}]}
            conn.request("POST", "/v2/models/linear/infer", body=json.dumps(body))
            answer = json.loads(conn.getresponse().read())
            conn.close()
            return np.array(answer["outputs"][0]["data"], np.float32).reshape(1, 3)

        def call(x: np.ndarray) -> np.ndarray:
            assert handle.grpc is not None
            client = grpcclient.InferenceServerClient(handle.grpc.url)
            inp = grpcclient.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            y = client.infer("linear", [inp]).as_numpy("y")
            client.close()
            return y

        with ThreadPoolExecutor(8) as pool:  # half over HTTP, half over gRPC, into one batcher
            ys = list(pool.map(lambda ix: (post if ix[0] % 2 else call)(ix[1]), enumerate(xs)))
        for x, y in zip(xs, ys, strict=True):
            np.testing.assert_allclose(y, x @ BASE_W + BASE_B, rtol=1e-6)
        # every one through the batcher, after the install's 4 self-test samples (how they shared runs: timing)
        assert served.runtime_model.requests == 4 + 8
    finally:
        agent.close()
