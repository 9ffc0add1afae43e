"""Capture on a real agent: the rules pick exactly what they say, only opted-in tensors are stored, and the
ring buffer holds its bounds under a flood and across a restart."""

from __future__ import annotations

import numpy as np

from edgepack.agent.capture import CaptureBuffer
from edgepack.capture_record import CaptureRecord
from tests.drift.conftest import infer
from tests.models import linear_reference

EXACT = {"drift.budget_ms_per_s": 1000.0, "drift.queue": 100_000, "drift.check_s": 0.0}


def _capture(**model):
    return {**EXACT, "capture.enabled": True, "capture.models": {"linear": model}}


def _records(agent) -> list[CaptureRecord]:
    buffer = agent.field_data.buffer
    return [CaptureRecord.from_bytes(buffer.read(r.seq)[0]) for r in buffer.records()]


def test_capture_is_off_by_default(make_agent, tmp_path):
    agent = make_agent(state=tmp_path / "state")
    for _ in range(20):
        infer(agent, np.zeros((1, 4), np.float32))
    assert agent.field_data.buffer is None
    assert not (tmp_path / "state" / "capture").exists()


def test_the_top_score_rule_captures_exactly_the_requests_below_the_threshold(make_agent):
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 4)).astype(np.float32) for _ in range(200)]
    scores = [float(linear_reference(x, 1.0).max()) for x in xs]
    threshold = float(np.median(scores))
    agent = make_agent(**_capture(inputs=["x"], outputs=True, top_score_below=threshold))
    for x in xs:
        infer(agent, x)
    assert agent.field_data.flush()
    records = _records(agent)
    expected = [x.tobytes() for x, s in zip(xs, scores, strict=True) if s < threshold]
    assert [r.inputs["x"].tobytes() for r in records] == expected  # exactly those, in order
    assert all(r.meta["rule"] == "top_score" and r.meta["model"] == "linear" for r in records)
    np.testing.assert_allclose(records[0].outputs["y"], linear_reference(records[0].inputs["x"], 1.0), rtol=1e-5)


def test_the_drift_rule_captures_only_while_drift_is_at_least_warn(make_agent):
    agent = make_agent(**{**_capture(inputs=["x"], when_drift="warn"), "drift.window": 512})
    rng = np.random.default_rng(4)
    for _ in range(400):
        infer(agent, rng.standard_normal((1, 4)).astype(np.float32))
    assert agent.field_data.flush()
    assert agent.field_data.drift("linear").level == "ok"
    assert agent.field_data.buffer.records() == []
    for _ in range(400):
        infer(agent, rng.standard_normal((1, 4)).astype(np.float32) * np.array([1, 1, 0, 1], np.float32))
    assert agent.field_data.flush()
    records = _records(agent)
    assert records and all(r.meta["rule"] == "drift" and r.meta["drift"] in ("warn", "alarm") for r in records)
    assert all(r.inputs["x"][0, 2] == 0 for r in records)  # only shifted requests


def test_only_opted_in_tensors_are_stored_and_stats_only_stores_no_values(make_agent):
    agent = make_agent(**_capture(outputs=True, random_share=1.0))  # no input opted in: outputs only
    infer(agent, np.ones((1, 4), np.float32))
    assert agent.field_data.flush()
    (record,) = _records(agent)
    assert record.inputs == {} and set(record.outputs) == {"y"}

    agent = make_agent(**_capture(inputs=["x"], stats_only=True, random_share=1.0))
    infer(agent, np.array([[1, 2, 3, 4]], np.float32))
    assert agent.field_data.flush()
    (record,) = _records(agent)
    assert record.inputs == {} and record.outputs == {}
    assert record.meta["stats"]["input.x"]["mean"] == [1.0, 2.0, 3.0, 4.0]


def test_the_ring_buffer_holds_its_bounds_under_a_flood_and_survives_a_restart(tmp_path):
    buffer = CaptureBuffer(tmp_path / "capture", max_bytes=40_000, max_count=25)
    payloads = [np.random.default_rng(i).bytes(1000 + 7 * i) for i in range(150)]
    for data in payloads:
        buffer.add(data)
        status = buffer.status()
        assert status["records"] <= 25 and status["bytes"] <= 40_000
    held = buffer.records()
    assert [r.seq for r in held] == list(range(151 - len(held), 151))  # the newest, oldest dropped first
    assert buffer.status()["dropped"] == 150 - len(held)
    assert buffer.add(b"x" * 50_000) is None  # larger than the bound alone: dropped at once, counted

    again = CaptureBuffer(tmp_path / "capture", max_bytes=40_000, max_count=25)
    assert [r.seq for r in again.records()] == [r.seq for r in held]
    assert again.read(held[-1].seq)[0] == payloads[-1]
    assert again.status()["dropped"] == 150 - len(held) + 1
    assert again.add(b"next") == 152  # sequence numbers go on across the restart


def test_a_flood_never_blocks_inference_and_every_request_is_accounted_for(make_agent):
    agent = make_agent(**{"capture.enabled": True, "capture.max_count": 10, "drift.queue": 4,
                          "capture.models": {"linear": {"inputs": ["x"], "random_share": 1.0}}})  # fmt: skip
    for _ in range(500):
        infer(agent, np.zeros((1, 4), np.float32))
    assert agent.field_data.flush()
    observer = agent.live.current("linear").observer
    assert observer.captured + observer.skipped == 500
    assert observer.skipped > 0  # the queue was full: requests skipped, not waited for
    for _ in range(12):  # and then at a pace the disk keeps up with: every one captured, the bound held
        infer(agent, np.zeros((1, 4), np.float32))
        assert agent.field_data.flush()
    assert observer.captured + observer.skipped == 512 and observer.captured >= 12
    status = agent.field_data.buffer.status()
    assert status["records"] == 10 and status["dropped"] == observer.captured - 10, (status, observer.status())
