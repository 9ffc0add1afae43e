"""compare.py: the accuracy report and the bar."""

from __future__ import annotations

import numpy as np

from edgepack.compiler.compare import AccuracyBar, compare_outputs, is_class_scores
from edgepack.manifest import TensorSpec

LOGITS = TensorSpec(name="logits", dtype="float32", shape=["batch", 10])
BOXES = TensorSpec(name="boxes", dtype="float32", shape=[1, 100, 4])
IDS = TensorSpec(name="ids", dtype="int64", shape=[1])


def _samples(name: str, arrays: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{name: a} for a in arrays]


def test_class_scores_get_agreement_and_labelled_accuracy() -> None:
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(1, 10)).astype(np.float32) for _ in range(100)]
    labels = np.array([r.argmax() for r in ref])
    labels[:5] = (labels[:5] + 1) % 10  # the reference is 95 % right
    got = [r.copy() for r in ref]
    for g in got[5:7]:  # two flipped predictions
        g[0, g.argmax()] = -10
    report = compare_outputs(_samples("logits", ref), _samples("logits", got), [LOGITS], labels=labels)
    out = report.outputs[0]
    assert out.kind == "class_scores"
    assert out.top1_agreement == 98.0
    assert out.accuracy_reference == 95.0 and out.accuracy_compiled == 93.0
    assert not report.passed
    assert any("top-1 agreement 98.00% < 99.00%" in f for f in report.failures)
    assert any("dropped 2.00 points" in f for f in report.failures)
    loose = compare_outputs(
        _samples("logits", ref), _samples("logits", got), [LOGITS], labels=labels, bar=AccuracyBar.from_max_drop(2.0)
    )
    assert loose.passed
    assert loose.to_dict()["outputs"]["logits"]["top1_agreement"] == 98.0


def test_values_are_held_to_cosine() -> None:
    rng = np.random.default_rng(1)
    ref = [rng.normal(size=(1, 100, 4)).astype(np.float32) for _ in range(10)]
    close = [r + 0.01 * rng.normal(size=r.shape).astype(np.float32) for r in ref]
    far = [r + 1.0 * rng.normal(size=r.shape).astype(np.float32) for r in ref]
    assert not is_class_scores(BOXES)
    assert compare_outputs(_samples("boxes", ref), _samples("boxes", close), [BOXES]).passed
    bad = compare_outputs(_samples("boxes", ref), _samples("boxes", far), [BOXES])
    assert not bad.passed and "cosine similarity" in bad.failures[0]
    assert bad.outputs[0].top1_agreement is None


def test_integer_outputs_must_match_exactly() -> None:
    ref = [np.array([i], np.int64) for i in range(100)]
    got = [np.array([i if i else 7], np.int64) for i in range(100)]
    report = compare_outputs(_samples("ids", ref), _samples("ids", got), [IDS])
    assert report.outputs[0].kind == "integers" and report.outputs[0].top1_agreement == 99.0
    assert report.passed
