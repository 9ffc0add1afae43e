"""Drift on a real agent: same-distribution traffic stays ok, shifted traffic reaches warn/alarm within the
window; the level reaches the device state, /metrics and `fleet devices`; a failure never fails a request."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient

from edgepack.fleet.registry import DeviceRecord, drift_summary
from tests.drift.conftest import infer, link_state
from tests.models import linear_reference

WINDOW = 512
# every request binned (no time budget, a queue longer than the traffic): exact counts
SETTINGS = {"drift.window": WINDOW, "drift.budget_ms_per_s": 1000.0, "drift.queue": 100_000}


def _traffic(agent, n, shift=lambda x, rng: x, seed=5):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        x = shift(rng.standard_normal((1, 4)).astype(np.float32), rng)
        np.testing.assert_allclose(infer(agent, x), linear_reference(x, 1.0), rtol=1e-5, atol=1e-5)
    assert agent.field_data.flush()


def test_same_distribution_through_the_http_api_stays_ok(make_agent):
    agent = make_agent(**SETTINGS)
    client = httpclient.InferenceServerClient(agent.start_api().url)
    rng = np.random.default_rng(11)
    report = agent.field_data.drift("linear")
    assert report is not None and report.level == "collecting"
    for _ in range(WINDOW):
        inp = httpclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(rng.standard_normal((1, 4)).astype(np.float32))
        client.infer("linear", [inp])
    assert agent.field_data.flush()
    report = agent.field_data.drift("linear")
    assert report.observed == WINDOW and report.window > WINDOW * 0.9
    assert report.level == "ok", report.to_json()
    assert all(c.psi < 0.1 for c in report.channels)


SHIFTS = {
    "scaled": (lambda x, rng: x * 2.0, None),
    "offset": (lambda x, rng: x + 1.0, None),
    "noised": (lambda x, rng: x + rng.standard_normal(x.shape).astype(np.float32) * 1.5, None),
    "dead channel": (lambda x, rng: x * np.array([1, 1, 0, 1], np.float32), 2),
}


@pytest.mark.parametrize("name", list(SHIFTS))
def test_shifted_traffic_reaches_warn_or_alarm_within_the_window(make_agent, name):
    shift, channel = SHIFTS[name]
    agent = make_agent(**SETTINGS)
    _traffic(agent, WINDOW // 2, seed=1)  # half a window of normal traffic first
    _traffic(agent, WINDOW, shift, seed=2)
    report = agent.field_data.drift("linear")
    assert report.level in ("warn", "alarm"), report.to_json()
    if channel is not None:
        assert report.level == "alarm"
        assert (report.worst[0].tensor, report.worst[0].channel) == ("x", channel)
        assert [c.level for c in report.channels if c.channel != channel] == ["ok"] * 3


def test_the_level_reaches_the_state_metrics_and_fleet_devices(make_agent):
    agent = make_agent(**SETTINGS)
    _traffic(agent, WINDOW, lambda x, rng: x * np.array([1, 1, 0, 1], np.float32))
    state = link_state(agent)  # what goes on the wire, read as an operator
    drift = state.models["linear"].drift
    assert drift is not None and drift.level == "alarm" and drift.worst[0].channel == 2
    record = DeviceRecord.from_state(state)
    assert drift_summary(record.models) == [("alarm", f"linear alarm (x[2] psi {drift.worst[0].psi:.2f})")]
    assert json.loads(json.dumps(agent.status()))["field_data"]["models"]["linear"]["drift"]["level"] == "alarm"
    text = agent.metrics.render()[0].decode()
    assert 'edgepack_drift_level{model="linear"} 2.0' in text
    assert 'edgepack_drift_psi{channel="2",model="linear",tensor="x"}' in text
    assert 'edgepack_drift_output_psi{channel="0",model="linear",tensor="y"}' in text


def test_every_kth_request_and_the_window_bound(make_agent):
    agent = make_agent(**{**SETTINGS, "drift.window": 64, "drift.every": 4})
    _traffic(agent, 400)
    report = agent.field_data.drift("linear")
    assert report.observed == 100
    assert 60 <= report.window <= 64


def test_the_time_budget_bounds_the_work(make_agent):
    agent = make_agent(**{"drift.budget_ms_per_s": 0.01})  # 10 µs per second: about one request per second
    _traffic(agent, 300)
    assert 1 <= agent.field_data.drift("linear").observed < 30


def test_a_failure_in_the_statistics_disables_them_and_never_fails_a_request(make_agent, caplog):
    agent = make_agent()
    observer = agent.live.current("linear").observer
    assert observer is not None

    def broken(inputs, outputs):
        raise FloatingPointError("injected")

    observer.monitor.add = broken
    _traffic(agent, 20)  # every answer still right (checked inside)
    assert observer.disabled == "FloatingPointError: injected"
    assert agent.field_data.drift("linear") is None
    assert "field data of linear" in caplog.text
    assert 'edgepack_field_data_disabled{model="linear"} 1.0' in agent.metrics.render()[0].decode()
