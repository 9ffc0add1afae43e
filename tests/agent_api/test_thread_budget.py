"""One thread budget for every loaded model, and per-model concurrency limits.

The runtimes' own session options are read back (onnxruntime's session options and config entries,
OpenVINO's compiled-model properties, LiteRT's interpreter threads), so these tests see what the runtime
was actually given. The budget itself is checked with a model that records how many budget units are in
use while it runs (a gate holds runs inside; no timing).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from edgepack.agent.config import load_config
from edgepack.agent.service import DeviceAgent
from edgepack.agent.threads import ServingPlan
from edgepack.manifest import TensorSpec
from edgepack.runtimes.base import LoadedModel, RuntimeOptions, get_backend
from edgepack.runtimes.threads import BudgetedModel, ThreadBudget
from tests.agent_api.test_overload import _wait_until
from tests.models import BASE_B, BASE_W, linear_bundle, linear_model

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def _ort_settings(model: LoadedModel) -> tuple[int, int, str, str]:
    session = model._session  # the onnxruntime session the backend built
    opts = session.get_session_options()
    return (
        opts.intra_op_num_threads,
        opts.inter_op_num_threads,
        opts.get_session_config_entry("session.intra_op.allow_spinning"),
        opts.get_session_config_entry("session.inter_op.allow_spinning"),
    )


@pytest.fixture(scope="module")
def linear_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("budget") / "linear.onnx"
    linear_model(path, 1.0)
    return path


def test_onnxruntime_sessions_get_bounded_threads_and_no_spinning(linear_onnx: Path) -> None:
    budget = ThreadBudget(total=2)
    for asked, intra in ((None, 2), (1, 1), (8, 2)):
        options = budget.runtime_options(RuntimeOptions(threads=asked))
        model = get_backend("onnxruntime").load(linear_onnx, options=options)
        assert _ort_settings(model) == (intra, 1, "0", "0")
        np.testing.assert_allclose(model.infer({"x": X})["y"], X @ BASE_W + BASE_B, rtol=1e-6)
        model.close()
    plain = get_backend("onnxruntime").load(linear_onnx, options=RuntimeOptions())
    assert plain._session.get_session_options().intra_op_num_threads == 0  # untouched without a budget
    with pytest.raises(Exception, match="allow_spinning"):
        plain._session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    plain.close()


def test_openvino_gets_bounded_threads_no_pinning_and_one_stream(linear_onnx: Path) -> None:
    options = ThreadBudget(total=2).runtime_options(RuntimeOptions(threads=1))
    model = get_backend("openvino").load(linear_onnx, options=options)
    compiled = model._compiled
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    assert compiled.get_property("ENABLE_CPU_PINNING") is False
    assert int(compiled.get_property("NUM_STREAMS")) == 1
    np.testing.assert_allclose(model.infer({"x": X})["y"], X @ BASE_W + BASE_B, rtol=1e-5)
    model.close()


def test_litert_gets_the_budgets_threads(tmp_path: Path) -> None:
    from tests.runtimes.conftest import build_fc_tflite

    fc = build_fc_tflite(tmp_path / "fc.tflite")
    options = ThreadBudget(total=3).runtime_options(RuntimeOptions(threads=2))
    model = get_backend("litert").load(fc.path, options=options)
    assert model.describe()["threads"] == 2
    model.close()


class _Recorder(LoadedModel):
    """Runs hold the gate; records the budget units in use across every model, at each run's start."""

    def __init__(self, units: int, shared: dict, gate: threading.Event) -> None:
        self.inputs = [TensorSpec(name="x", dtype="float32", shape=["n"])]
        self.outputs = [TensorSpec(name="y", dtype="float32", shape=["n"])]
        self._units, self._shared, self._gate = units, shared, gate

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._shared["lock"]:
            self._shared["units"] += self._units
            self._shared["inside"] += 1
            self._shared["peak"] = max(self._shared["peak"], self._shared["units"])
        assert self._gate.wait(30)
        with self._shared["lock"]:
            self._shared["units"] -= self._units
            self._shared["inside"] -= 1
        return {"y": inputs["x"]}

    def close(self) -> None:
        pass


def _hammer(models: list[LoadedModel], per_model: int) -> list[threading.Thread]:
    threads = [
        threading.Thread(target=m.infer, args=({"x": np.ones(2, np.float32)},)) for m in models for _ in range(per_model)
    ]
    for t in threads:
        t.start()
    return threads


def test_runs_across_models_never_take_more_threads_than_the_budget() -> None:
    shared = {"lock": threading.Lock(), "units": 0, "inside": 0, "peak": 0}
    gate = threading.Event()
    budget = ThreadBudget(total=3)
    wide = budget.bound(_Recorder(2, shared, gate), threads=2)  # each run takes 2 of the 3 threads
    narrow = [budget.bound(_Recorder(1, shared, gate), threads=1) for _ in range(2)]
    threads = _hammer([wide, *narrow], per_model=4)
    _wait_until(lambda: shared["inside"] >= 2, "runs inside the models")
    gate.set()
    for t in threads:
        t.join(30)
    assert shared["peak"] <= 3 and shared["inside"] == 0
    assert budget.in_use_peak <= 3
    assert wide.max_concurrency == 1 and narrow[0].max_concurrency == 3  # as many as the budget fits


def test_a_model_runs_at_most_its_concurrency_limit() -> None:
    shared = {"lock": threading.Lock(), "units": 0, "inside": 0, "peak": 0}
    gate = threading.Event()
    limited = BudgetedModel(_Recorder(1, shared, gate), ThreadBudget(total=8), threads=1, max_concurrency=2)
    threads = _hammer([limited], per_model=5)
    _wait_until(lambda: shared["inside"] == 2, "two runs inside")
    assert shared["inside"] == 2  # the other three wait for the model's limit, not for the budget
    gate.set()
    for t in threads:
        t.join(30)
    assert shared["peak"] == 2


def test_the_agent_applies_the_budget_to_what_it_installs(tmp_path: Path, keyring, trust) -> None:
    config = load_config(
        None,
        {
            "state_dir": str(tmp_path / "state"),
            "trust_dir": str(trust.directory),
            "runtime.thread_budget": 2,
            "models": {"linear": {"threads": 1, "max_concurrency": 1}},
        },
    )
    agent = DeviceAgent(config)
    try:
        bundle, _ = linear_bundle(tmp_path, keyring.keys["release"])
        agent.install(bundle)
        served = agent.live.current("linear")
        assert served is not None and isinstance(served.runtime_model, BudgetedModel)
        assert served.runtime_model.threads == 1 and served.runtime_model.max_concurrency == 1
        assert _ort_settings(served.runtime_model.inner) == (1, 1, "0", "0")
        np.testing.assert_allclose(served.infer({"x": X})["y"], X @ BASE_W + BASE_B, rtol=1e-6)
    finally:
        agent.close()


def test_no_budget_leaves_models_as_loaded() -> None:
    plan = ServingPlan.from_config(load_config(None))
    assert plan.budget is None and plan.batch_threads == 1
    assert plan.runtime_options("m", RuntimeOptions(threads=2)) == RuntimeOptions(threads=2)
