"""What the local API does, without HTTP: health, metadata, repository index and inference.

The transport (``app.py``) parses URLs and headers and maps errors to status codes; the codecs turn
bytes into arrays and back; this module joins them to the :class:`ModelRepository`. Every method is
blocking: the transport calls :meth:`DataPlane.infer` from a worker thread, never on the event loop.

Inference order: lease the model (404/503 before anything else, so an unknown name is never decoded),
parse and check the request against the model's signature, decode, run, release the lease, encode.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import edgepack
from edgepack.agent.api.codec import (
    EncodedResponse,
    InferenceRequest,
    decode_inputs,
    encode_response,
    parse_request,
)
from edgepack.agent.api.datatypes import kserve_datatype, metadata_shape
from edgepack.agent.api.repository import ModelRepository, ServedModel
from edgepack.agent.api.validation import check_inputs, check_outputs
from edgepack.errors import BadRequestError, ModelNotFoundError
from edgepack.manifest import TensorSpec

__all__ = ["EXTENSIONS", "SERVER_NAME", "DataPlane"]

SERVER_NAME = "edgepack"
EXTENSIONS = ["binary_tensor_data"]


class DataPlane:
    """The KServe v2 operations over one model repository."""

    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository

    def server_ready(self) -> bool:
        return not self._repository.unready_models()

    def unready_models(self) -> dict[str, str]:
        """The models that keep the server from being ready, name → why; empty when it is ready."""
        return self._repository.unready_models()

    def model_readiness(self, name: str, version: str | None = None) -> tuple[bool, str]:
        """Whether the model can serve, and if not why; ModelNotFoundError for an unknown name or version."""
        ready = self._repository.ready(name, version)
        if ready:
            return True, ""
        why = self._repository.unready_models().get(name)
        if why is None:  # not one the server waits for (e.g. its first install failed): the index says why
            why = next((e.get("reason") for e in self._repository.index() if e.get("name") == name), None)
        return False, why or "not ready"

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": edgepack.__version__, "extensions": list(EXTENSIONS)}

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a model of the repository (ready or not): metrics label only known names."""
        try:
            self._repository.ready(name)
        except ModelNotFoundError:
            return False
        return True

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Whether the model can serve; ModelNotFoundError for an unknown name or version."""
        return self._repository.ready(name, version)

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """KServe model metadata: versions known, platform, and the signature with -1 for dynamic dims."""
        with self._repository.acquire(name, version) as model:
            return {
                "name": model.name,
                "versions": self._versions(model),
                "platform": model.platform,
                "inputs": [_tensor_metadata(spec) for spec in model.inputs],
                "outputs": [_tensor_metadata(spec) for spec in model.outputs],
            }

    def _versions(self, model: ServedModel) -> list[str]:
        versions = [e["version"] for e in self._repository.index() if e.get("name") == model.name]
        if model.version not in versions:
            versions.append(model.version)
        return list(dict.fromkeys(versions))

    def repository_index(self, body: Any = None) -> list[dict[str, str]]:
        """The repository index; a body ``{"ready": true}`` keeps only the models that are ready."""
        if body is not None and not isinstance(body, dict):
            raise BadRequestError("the repository index request must be a JSON object")
        ready_only = bool(body.get("ready", False)) if body else False
        entries = self._repository.index()
        if ready_only:
            entries = [e for e in entries if e.get("state") == "READY"]
        return entries

    def infer(self, name: str, version: str | None, body: bytes, header_length: int | None = None) -> EncodedResponse:
        """Run one inference request on the model ``name`` and encode its response."""
        with self._repository.acquire(name, version) as model:
            request = parse_request(body, header_length)
            results = _run(model, request)
            model_name, model_version = model.name, model.version
        return encode_response(model_name, model_version, request, results)

    def infer_parsed(
        self, name: str, version: str | None, request: InferenceRequest
    ) -> tuple[str, str, dict[str, np.ndarray]]:
        """Run a request another transport parsed (gRPC); (model name, version, outputs) for its encoder."""
        with self._repository.acquire(name, version) as model:
            return model.name, model.version, _run(model, request)


def _run(model: ServedModel, request: InferenceRequest) -> dict[str, np.ndarray]:
    check_inputs(request.inputs, model.inputs)
    check_outputs(request.outputs, model.outputs)
    return model.infer(decode_inputs(request))


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": kserve_datatype(spec.dtype), "shape": metadata_shape(spec.shape)}
