"""The accuracy-aware int8 search keeps memory bounded: peak RSS of a compile that has to search (a
DBNet-style detector at 640×640 with an outlier channel, so plain int8 fails and the per-node analysis
runs) stays within what an fp32 compile of the same model takes plus a bound computed from the model's
activation size — not from the number of samples.

Why the bound catches the old behaviour: the analysis used to hold every activation of every analysis
sample of both models (16 samples × 2 models × the activations of one sample — about 32 × A, A = 40 MiB
here, so ~1.3 GB over the fp32 compile), and the histogram calibrations every activation of every
calibration sample. The bound allows one streamed group (:data:`ANALYSIS_GROUP_BYTES`), a few samples'
activations (the sessions' own buffers) and fixed slack: 6 × A + 256 MiB + 256 MiB ≈ 750 MiB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from edgepack.compiler.node_errors import ANALYSIS_GROUP_BYTES, _shapes, activation_bytes

from .conftest import Signing
from .detector_models import blob_images, text_detector

SIZE = 640
_SLACK = 256 * 2**20

# Runs one compile in a child of a fresh interpreter and prints the child's peak RSS (ru_maxrss, KiB on
# Linux): RUSAGE_CHILDREN of the wrapper is that compile alone.
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "print(json.dumps({'rc': done.returncode, 'out': done.stdout, 'err': done.stderr[-3000:],"
    " 'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
)


def _compile(model: Path, calibration: Path, precision: str, signing: Signing, out: Path) -> tuple[dict, int]:
    command = [sys.executable, "-m", "edgepack", "compile", str(model), "-t", "x86", "-p", precision]
    command += ["-c", str(calibration), "-k", str(signing.key_file), "-o", str(out), "--json"]
    wrapper = subprocess.run(
        [sys.executable, "-c", "import json\n" + _WRAPPER, *command],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert wrapper.returncode == 0, wrapper.stderr
    report = json.loads(wrapper.stdout)
    assert report["rc"] == 0, report["err"]
    return json.loads(report["out"]), int(report["maxrss_kib"]) * 1024


def test_int8_search_on_a_640_detector_stays_within_a_bound_from_the_model_size(
    signing: Signing, tmp_path: Path
) -> None:
    model = text_detector(tmp_path / "det.onnx", size=SIZE, width=16, outlier=1e3)
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, x=blob_images(16, SIZE))
    proto = onnx.load(str(model))
    shapes = _shapes(proto)
    tensors = [o for n in proto.graph.node for o in n.output]
    per_sample = activation_bytes(shapes, tensors)
    assert per_sample > 30 * 2**20  # large enough that holding every sample would show

    _fp32, fp32_rss = _compile(model, calibration, "fp32", signing, tmp_path / "fp32.epk")
    result, int8_rss = _compile(model, calibration, "int8", signing, tmp_path / "int8.epk")

    tries = result["attempts"][0]["tries"]
    assert len(tries) >= 2 and tries[0]["passed"] is False, tries  # the search ran: analysis and re-quantizing
    bound = fp32_rss + ANALYSIS_GROUP_BYTES + 6 * per_sample + _SLACK
    assert int8_rss <= bound, (
        f"int8 compile peaked at {int8_rss / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB "
        f"(fp32 compile {fp32_rss / 2**20:.0f} MiB, one sample's activations {per_sample / 2**20:.0f} MiB)"
    )
