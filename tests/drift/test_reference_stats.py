"""Reference statistics: written by the real compiler into the signed bundle, fixed in size, read back."""

from __future__ import annotations

import tarfile

import numpy as np

from edgepack.bundle import verify_bundle
from edgepack.manifest import TensorSpec
from edgepack.refstats import BINS, FILE_NAME, MAX_GROUPS, METADATA_KEY, ReferenceStats, summarize


def _stats(bundle) -> ReferenceStats:
    with tarfile.open(bundle) as tar:
        return ReferenceStats.from_bytes(tar.extractfile(FILE_NAME).read())  # type: ignore[union-attr]


def test_the_compiled_bundle_carries_signed_reference_statistics(compiled):
    manifest = verify_bundle(compiled.bundle, compiled.trust)  # signatures and every payload hash
    assert manifest.metadata[METADATA_KEY] == FILE_NAME
    assert FILE_NAME in {f.path for f in manifest.files}
    stats = _stats(compiled.bundle)
    x = stats.inputs["x"]
    assert (x.channels, x.groups, x.axis, x.samples) == (4, 4, 1, len(compiled.calibration))
    np.testing.assert_allclose(x.mean, compiled.calibration.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(x.std, compiled.calibration.std(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(x.min, compiled.calibration.min(axis=0))
    np.testing.assert_array_equal(x.max, compiled.calibration.max(axis=0))
    np.testing.assert_allclose(x.hist.sum(axis=1), 1.0)
    assert np.all(np.abs(x.hist - 1 / BINS) < 0.02)  # equal-mass bins on the calibration data
    assert set(stats.outputs) == {"y"} and stats.outputs["y"].channels == 3


def _leaves(value) -> int:
    if isinstance(value, dict):
        return sum(_leaves(v) for v in value.values())
    if isinstance(value, list):
        return sum(_leaves(v) for v in value)
    return 1


def test_the_summary_has_a_fixed_size_whatever_the_data():
    spec = TensorSpec(name="image", dtype="float32", shape=[1, 200, 4, 4], layout="NCHW")
    rng = np.random.default_rng(1)
    small = summarize(spec, [rng.standard_normal((1, 200, 4, 4)).astype(np.float32) for _ in range(4)])
    large = summarize(spec, [rng.standard_normal((1, 200, 4, 4)).astype(np.float32) for _ in range(400)])
    assert small is not None and large is not None
    assert small.groups == large.groups == MAX_GROUPS and small.channels == 200
    leaves = [_leaves(s.to_json()) for s in (small, large)]
    assert leaves[0] == leaves[1] <= MAX_GROUPS * (3 * BINS + 6) + 10  # numbers stored: not the data's size


def test_channel_axis_follows_the_layout_and_non_finite_values_are_counted():
    spec = TensorSpec(name="image", dtype="float32", shape=[1, 6, 6, 3], layout="NHWC")
    arrays = [np.full((1, 6, 6, 3), [0.0, 1.0, 2.0], dtype=np.float32) for _ in range(3)]
    arrays[0][0, 0, 0, 1] = np.nan
    stats = summarize(spec, arrays)
    assert stats is not None and stats.axis == 3 and stats.channels == 3
    np.testing.assert_allclose(stats.mean, [0.0, 1.0, 2.0])
    np.testing.assert_allclose(stats.nonfinite, [0.0, 1 / 108, 0.0])
    again = ReferenceStats.from_bytes(ReferenceStats({"image": stats}, {}).to_bytes()).inputs["image"]
    np.testing.assert_array_equal(again.edges, stats.edges)  # +inf padding survives JSON
    np.testing.assert_allclose(again.nonfinite, stats.nonfinite)
