"""Small helpers for the local API tests: raw HTTP calls and tritonclient inputs."""

from __future__ import annotations

import http.client
import json
from typing import Any

import numpy as np
import tritonclient.http as httpclient

from edgepack.agent.api import ServerHandle
from tests.agent_api.fakes import linear


def raw(
    server: ServerHandle,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    chunked: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def error_of(body: bytes) -> str:
    doc: dict[str, Any] = json.loads(body)
    assert set(doc) == {"error"}
    return str(doc["error"])


def binary_request(header: dict[str, Any], *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body and its headers, as tritonclient lays them out."""
    head = json.dumps(header).encode()
    return head + b"".join(tensors), {"Inference-Header-Content-Length": str(len(head))}


def x_input(x: np.ndarray, *, binary: bool = True) -> httpclient.InferInput:
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def assert_serves(client: httpclient.InferenceServerClient) -> None:
    """The server still answers a correct inference correctly."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    result = client.infer("linear", [x_input(x)])
    np.testing.assert_allclose(result.as_numpy("y"), linear(x)["y"], rtol=1e-6)
