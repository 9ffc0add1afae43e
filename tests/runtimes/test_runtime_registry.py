"""get_backend: the right backend class, and an actionable error when a runtime is missing."""

from __future__ import annotations

import pytest

from edgepack.errors import RuntimeNotInstalledError
from edgepack.runtimes import get_backend, known_runtimes
from edgepack.runtimes.litert_backend import LiteRtBackend
from edgepack.runtimes.onnxruntime_backend import OnnxRuntimeBackend
from edgepack.runtimes.openvino_backend import OpenVinoBackend

BACKENDS = {"onnxruntime": OnnxRuntimeBackend, "openvino": OpenVinoBackend, "litert": LiteRtBackend}
EXTRAS = {"onnxruntime": "agent-onnx", "openvino": "agent-openvino", "litert": "agent-litert"}


def test_every_known_runtime_has_a_backend() -> None:
    assert set(known_runtimes()) == set(BACKENDS)
    for name, cls in BACKENDS.items():
        assert (cls.name, cls.extra) == (name, EXTRAS[name])


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_installed_runtime_gives_its_backend(name: str) -> None:
    pytest.importorskip(BACKENDS[name].module)
    assert isinstance(get_backend(name), BACKENDS[name])


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_missing_runtime_names_the_extra(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BACKENDS[name], "installed_version", classmethod(lambda cls: None))
    with pytest.raises(RuntimeNotInstalledError, match=rf"pip install 'edgepack\[{EXTRAS[name]}\]'"):
        get_backend(name)


def test_unknown_runtime_lists_the_known_ones() -> None:
    with pytest.raises(RuntimeNotInstalledError, match="unknown runtime 'tensorrt'; edgepack knows onnxruntime"):
        get_backend("tensorrt")
