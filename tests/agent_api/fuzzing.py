"""What the local API's fuzz tests share: counts by kind, a raw HTTP/1.1 sender, and request strategies.

The sender writes the request bytes itself (http.client refuses many of the malformed headers worth
sending) on a fresh connection with ``Connection: close`` and reads until the server closes. A request
whose body is shorter than its ``Content-Length`` is half-closed after sending, so the server sees the end
of the stream instead of waiting for bytes that never come.

Settings, JSON strategies and the mutators come from ``tests/fuzz/common.py`` (bounded, derandomized).
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

# inputs tried, by kind, and how each ended; tests/agent_api/conftest.py prints them after the run
COUNTS: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODELS = ("linear", "half", "bytes_echo", "guarded", "dyn")  # none of them fails or is slow on purpose


def dyn_model() -> Any:
    """``dyn``: y = x for FP32 x of any [a, b], so huge and odd shapes get past validation into the codec."""
    from edgepack.manifest import TensorSpec
    from tests.agent_api.fakes import FunctionModel

    spec = [TensorSpec(name="x", dtype="float32", shape=["a", "b"])]
    out = [TensorSpec(name="y", dtype="float32", shape=["a", "b"])]
    return FunctionModel("dyn", "1.0.0", spec, out, lambda inputs: {"y": inputs["x"]})


@dataclass
class Answer:
    status: int | None  # None: the server closed the connection without an answer
    headers: dict[str, str]
    body: bytes


def send_raw(
    host: str,
    port: int,
    method: bytes,
    path: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    half_close: bool = False,
    timeout: float = 20.0,
) -> Answer:
    """One request on a fresh connection, framed as given (no Content-Length added)."""
    head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" % (method, path)
    head += b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(head + b"\r\n" + body)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before it read everything: read what it said
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    return parse_answer(b"".join(chunks))


def parse_answer(raw: bytes) -> Answer:
    if not raw:
        return Answer(None, {}, b"")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    assert parts[0].startswith(b"HTTP/1."), f"not an HTTP answer: {raw[:80]!r}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return Answer(int(parts[1]), headers, body)


def record(kind: str, answer: Answer) -> None:
    """Count the input, and fail on any 5xx (the fuzz server is never loaded enough for a 503)."""
    COUNTS[kind] += 1
    OUTCOMES[f"{kind}: {answer.status if answer.status is not None else 'closed, no answer'}"] += 1
    assert answer.status is None or answer.status < 500, f"{kind}: {answer.status} {answer.body[:300]!r}"
    json_error = (
        answer.status is not None and answer.status >= 400 and answer.headers.get("content-type") == "application/json"
    )
    if json_error and answer.body:  # (a HEAD request's answer has no body)
        doc = json.loads(answer.body)
        assert isinstance(doc.get("error"), str) and doc["error"], answer.body[:200]


# --- request strategies ----------------------------------------------------------------------------

VALID = {
    "linear": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [0.5] * 8}]},
    "half": {
        "inputs": [
            {"name": "a", "datatype": "FP16", "shape": [1, 8], "data": [1] * 8},
            {"name": "b", "datatype": "FP16", "shape": [1, 8], "data": [2] * 8},
        ],
        "outputs": [{"name": "sum"}],
    },
    "bytes_echo": {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["ab", "ç"]}]},
    "guarded": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
    "dyn": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]}]},
}

INTERESTING: dict[str, list[Any]] = {
    "name": ["", "x", "a", "text", "\ud800", "é" * 300, None, 7, ["x"]],
    "datatype": ["FP32", "FP16", "BYTES", "BF16", "INT64", "UINT64", "BOOL", "fp32", "", None, 3, "FP" * 50],
    "shape": [[], [-1], [2**63], [2**64, 2**64], [0, 4], [0, 2**62], [1] * 40, [1] * 70, [1.5], ["1"], None, {}],
    "data": [None, [], [[]], [None], ["a"], [1e400], [2**64], [-(2**63) - 1], [True], [{"a": 1}], "x", [[1], [1, 2]]],
    "parameters": [None, [], "x", {"binary_data_size": -1}, {"binary_data_size": 2**70}, {"shared_memory_region": "r"}],
    "outputs": [None, [], {}, [{"name": "y", "parameters": {"binary_data": "yes"}}], [{"name": 1}], ["y"]],
    "id": [None, 1, "", "\ud800", "x" * 1000, ["id"]],
}

# literal JSON a standard encoder never writes: NaN/Infinity, lone surrogates, huge numbers, odd escapes
ODD_LITERALS = [
    b"NaN",
    b"-Infinity",
    b"Infinity",
    b"1e400",
    b"-1e400",
    b"123456789012345678901234567890",
    b'"\\ud800"',
    b'"\\udfff\\ud800"',
    b'"\\u0000"',
    b'"\xff\xfe"',
    b"[1,]",
    b"01",
    b"true",
    b"{}",
]


@st.composite
def odd_literal_body(draw: st.DrawFn, model: str) -> bytes:
    """A valid request for ``model`` with one value replaced by an odd literal, spliced in as bytes."""
    marker = "\u2603MARK\u2603"
    doc = json.loads(json.dumps(VALID[model]))
    field = draw(st.sampled_from(["name", "datatype", "shape", "data", "element", "id"]))
    target = doc["inputs"][0]
    if field == "element":
        target["data"][0] = marker
    elif field == "id":
        doc["id"] = marker
    else:
        target[field] = marker
    text = json.dumps(doc, ensure_ascii=False).encode()
    return text.replace(json.dumps(marker, ensure_ascii=False).encode(), draw(st.sampled_from(ODD_LITERALS)))


def binary_layout(model: str, doc: dict[str, Any]) -> tuple[bytes, bytes]:
    """``doc`` as a binary-extension request: (JSON header, tensor bytes) for ``linear``'s FP32 input."""
    import numpy as np

    raw = np.arange(8, dtype=np.float32).tobytes()
    doc = json.loads(json.dumps(doc))
    inp = doc["inputs"][0]
    inp.pop("data", None)
    inp.setdefault("parameters", {})["binary_data_size"] = len(raw)
    doc["outputs"] = [{"name": "y", "parameters": {"binary_data": True}}]
    return json.dumps(doc).encode(), raw
