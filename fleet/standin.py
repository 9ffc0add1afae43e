"""A stand-in runtime for the fleet simulator: loads nothing, answers the bundle's own self-test vectors.

The simulator runs the real agent (store, install state machine, MQTT link, command book, receiver) on
hundreds of devices per process; only the runtime is replaced, because loading onnxruntime sessions
would measure the runtime, not the fleet. :func:`use_stand_in` points the runtime registry
(``edgepack.runtimes.base``'s table of backends) at :class:`StandInBackend` for every runtime name, in
this process only.

The stand-in answers an input it finds in the self-test vectors (``*.npz`` beside the model file) with
the recorded output, anything else with zeros of the output's shape. A device whose
``RuntimeOptions.extra["fault"]`` is ``"selftest"`` answers off by one, so the bundle's self-test fails
on it (the fault the simulator injects).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.manifest import TensorSpec
from edgepack.runtimes import base
from edgepack.runtimes.base import LoadedModel, RuntimeBackend, RuntimeOptions
from edgepack.runtimes.tensors import numpy_dtype
from edgepack.selftest import read_vectors

STAND_IN = "edgepack.fleet.standin:StandInBackend"


def use_stand_in() -> None:
    """Serve every runtime name with the stand-in in this process (the simulator's worker processes)."""
    for name in base.known_runtimes():
        base._BACKENDS[name] = (STAND_IN, "agent")


def _key(inputs: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(inputs):
        array = np.ascontiguousarray(inputs[name])
        digest.update(name.encode() + str(array.shape).encode() + array.tobytes())
    return digest.hexdigest()


class StandInModel(LoadedModel):
    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec], table: dict[str, dict[str, Any]],
                 offset: float) -> None:  # fmt: skip
        self.inputs, self.outputs, self._table, self._offset = inputs, outputs, table, offset

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        known = self._table.get(_key(inputs))
        if known is None:
            batch = next(iter(inputs.values())).shape[0] if inputs else 1
            known = {
                spec.name: np.zeros([batch] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]],
                                    dtype=numpy_dtype(spec.dtype))
                for spec in self.outputs
            }  # fmt: skip
        return {name: value + self._offset if self._offset else value for name, value in known.items()}

    def close(self) -> None:
        self._table = {}


class StandInBackend(RuntimeBackend):
    name = "stand-in"
    extra = "agent"
    module = "numpy"

    @classmethod
    def installed_version(cls) -> str | None:
        return "999.0"  # admits any version range a bundle asks for

    def load(
        self, model_path: Path, *, inputs: Sequence[TensorSpec] = (), outputs: Sequence[TensorSpec] = (),
        execution: Mapping[str, Any] | None = None, options: RuntimeOptions | None = None,
    ) -> LoadedModel:  # fmt: skip
        table: dict[str, dict[str, Any]] = {}
        for vectors in sorted(Path(model_path).parent.glob("*.npz")):
            samples_in, samples_out = read_vectors(vectors)
            for sample_in, sample_out in zip(samples_in, samples_out):
                table[_key(sample_in)] = sample_out
        fault = (options.extra.get("fault") if options else None) == "selftest"
        return StandInModel(list(inputs), list(outputs), table, 1.0 if fault else 0.0)
