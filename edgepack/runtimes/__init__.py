"""Runtime backends (onnxruntime, OpenVINO, LiteRT) behind one small interface."""

from edgepack.runtimes.base import LoadedModel, RuntimeBackend, RuntimeOptions, get_backend, known_runtimes

__all__ = ["LoadedModel", "RuntimeBackend", "RuntimeOptions", "get_backend", "known_runtimes"]
