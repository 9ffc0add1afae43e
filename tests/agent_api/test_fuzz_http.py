"""Fuzzing the local API over real HTTP on 127.0.0.1: malformed bodies, binary-extension lengths that lie,
and bad headers (Content-Length, Content-Type, Content-Encoding, Authorization, methods and paths).

Pass means: every answer is below 500 (no 503 either: the load bound is never reached by one client
sending one request at a time), every JSON error has a message, and the server still serves correctly
afterwards. Bounded and reproducible (``fuzz_settings``: derandomized, a few hundred examples in all);
the counts by kind are printed after the run (tests/agent_api/conftest.py).
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import tritonclient.http as httpclient
from hypothesis import given
from hypothesis import strategies as st

from edgepack.agent.api import ApiMetrics, ServerHandle, start_in_thread
from edgepack.agent.api.static_repository import StaticRepository
from tests.agent_api.fakes import make_models
from tests.agent_api.fuzzing import (
    AUTH,
    COUNTS,
    INTERESTING,
    MODELS,
    TOKEN,
    VALID,
    binary_layout,
    dyn_model,
    odd_literal_body,
    record,
    send_raw,
)
from tests.agent_api.helpers import assert_serves
from tests.fuzz.common import deep_nesting, fuzz_settings, json_values, mutated_bytes, mutated_json

MAX_BODY = 1 << 20
_AUTH = [(b"Authorization", f"Bearer {TOKEN}".encode())]


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerHandle]:
    models = [m for m in make_models() if m.name in MODELS] + [dyn_model()]
    handle = start_in_thread(
        StaticRepository(models), port=0, token=TOKEN, max_body_bytes=MAX_BODY, workers=2, metrics=ApiMetrics()
    )
    yield handle
    handle.stop()


@pytest.fixture(scope="module", autouse=True)
def still_serving_after(fuzz_server: ServerHandle) -> Iterator[None]:
    yield
    # after every fuzz test of this module: the server is alive and answers a correct request correctly
    assert fuzz_server._thread.is_alive()
    client = httpclient.InferenceServerClient(fuzz_server.url)
    try:
        assert client.is_server_live()
        assert_serves_with_token(client)
    finally:
        client.close()


def assert_serves_with_token(client: httpclient.InferenceServerClient) -> None:
    original = client.infer

    def infer(*args, **kwargs):
        return original(*args, headers=AUTH, **kwargs)

    client.infer = infer  # type: ignore[method-assign]
    assert_serves(client)


def _post(server: ServerHandle, model: str, body: bytes, headers: list[tuple[bytes, bytes]] | None = None):
    framing = [(b"Content-Length", str(len(body)).encode()), (b"Content-Type", b"application/json")]
    return send_raw(
        server.host, server.port, b"POST", f"/v2/models/{model}/infer".encode(), _AUTH + framing + (headers or []), body
    )


# --- bodies ------------------------------------------------------------------------------------------


def _for_model(kind: str, make) -> st.SearchStrategy[tuple[str, str, bytes]]:
    """(kind, model, body) with the body made for that model by ``make(model)``."""
    return st.sampled_from(MODELS).flatmap(lambda m: st.tuples(st.just(kind), st.just(m), make(m)))


def _shaped(shape: list[int]) -> bytes:
    """A ``dyn`` request of ``shape`` whose data fits it when that is small (so more of them reach the model)."""
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    data = [1.0] * (count if 0 <= count <= 64 else 6)
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": data}]}).encode()


_dims = st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, 2, 3, 6, 2**31, 2**62, 2**63, 2**64])


def _deep(depth: int, where: str) -> bytes:
    if where != "data":
        return deep_nesting(depth, where)
    return b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1],"data":' + deep_nesting(depth) + b"}]}"


_bodies = st.one_of(
    _for_model("body: random bytes", lambda m: st.binary(max_size=300)),
    _for_model("body: mutated bytes of a valid request", lambda m: mutated_bytes(json.dumps(VALID[m]).encode())),
    _for_model(
        "body: wrong types and values",
        lambda m: mutated_json(VALID[m], INTERESTING).map(lambda d: json.dumps(d).encode()),
    ),
    st.tuples(
        st.just("body: huge, negative, odd shapes"),
        st.just("dyn"),
        (st.lists(_dims, min_size=2, max_size=2) | st.lists(_dims, max_size=70)).map(_shaped),
    ),
    _for_model("body: NaN, unicode and odd literals", odd_literal_body),
    st.tuples(
        st.just("body: deep nesting"),
        st.just("dyn"),
        st.builds(_deep, st.integers(1, 20000), st.sampled_from(["list", "dict", "data"])),
    ),
    _for_model("body: any JSON value", lambda m: json_values.map(lambda v: json.dumps(v).encode())),
)


@fuzz_settings(260)
@given(case=_bodies)
def test_fuzz_infer_bodies(fuzz_server: ServerHandle, case: tuple[str, str, bytes]) -> None:
    kind, model, body = case
    record(kind, _post(fuzz_server, model, body))


# --- the binary tensor extension -------------------------------------------------------------------

_LIES = st.one_of(st.integers(-64, 64), st.sampled_from([-(2**63), 2**31, 2**63, 2**70]))


@fuzz_settings(120)
@given(
    header_lie=st.none() | _LIES | st.sampled_from([b"abc", b"", b" 12", b"0x10", b"1e3", b"\xff"]),
    size_lie=st.none() | _LIES | st.sampled_from(["8", 1.5, None, True, [32]]),
    tail=st.sampled_from(["exact", "short", "long", "empty"]),
    shape=st.sampled_from([[2, 4], [8], [2, 5], [0, 4], [2**40, 4]]),
)
def test_fuzz_binary_extension_lengths(fuzz_server: ServerHandle, header_lie, size_lie, tail, shape) -> None:
    doc = json.loads(json.dumps(VALID["linear"]))
    doc["inputs"][0]["shape"] = shape
    head, raw = binary_layout("linear", doc)
    if size_lie is not None:
        lied = len(raw) + size_lie if isinstance(size_lie, int) and not isinstance(size_lie, bool) else size_lie
        parsed = json.loads(head)
        parsed["inputs"][0]["parameters"]["binary_data_size"] = lied
        head = json.dumps(parsed).encode()
    tensor = {"exact": raw, "short": raw[:5], "long": raw + b"\0" * 7, "empty": b""}[tail]
    if header_lie is None:
        header_value = str(len(head)).encode()
    elif isinstance(header_lie, bytes):
        header_value = header_lie
    else:
        header_value = str(len(head) + header_lie).encode()
    honest = header_lie is None and size_lie is None and tail == "exact"
    kind = "binary: honest lengths" if honest else "binary: lengths that lie"
    record(kind, _post(fuzz_server, "linear", head + tensor, [(b"Inference-Header-Content-Length", header_value)]))


# --- headers, methods and paths ---------------------------------------------------------------------

_TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# header values: mostly what HTTP allows (visible ASCII, obs-text, tabs), sometimes any byte but CR/LF
_header_value = st.one_of(
    st.binary(max_size=60).map(lambda b: bytes(c for c in b if c == 9 or 32 <= c != 127)),
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
_header_name = st.text(alphabet=_TCHARS, min_size=1, max_size=20).map(str.encode)


@st.composite
def _headers_case(draw: st.DrawFn) -> tuple[str, bytes, bytes, list[tuple[bytes, bytes]], bytes, bool]:
    body = json.dumps(VALID["linear"]).encode()
    auth = list(_AUTH)
    framing: list[tuple[bytes, bytes]] = [(b"Content-Length", str(len(body)).encode())]
    extra: list[tuple[bytes, bytes]] = []
    half_close = False
    kind = draw(
        st.sampled_from(
            ["content-length", "content-type", "content-encoding", "authorization", "random headers", "method and path"]
        )
    )
    method, path = b"POST", b"/v2/models/linear/infer"
    if kind == "content-length":
        value = draw(
            st.sampled_from([b"abc", b"-1", b"", b"1.5", b"99999999999999999999", b"0x10", b"+5", b" 5"])
            | st.integers(0, len(body) + 64).map(lambda n: str(n).encode())
        )
        framing = [(b"Content-Length", value)]
        if draw(st.booleans()):
            framing.append((b"Content-Length", str(len(body)).encode()))  # given twice
        half_close = value.isdigit() and int(value) > len(body)
    elif kind == "content-type":
        extra.append(
            (
                b"Content-Type",
                draw(
                    st.sampled_from(
                        [
                            b"text/plain",
                            b"application/octet-stream",
                            b"multipart/form-data; boundary=x",
                            b"",
                            b"\xff\xfe",
                            b"application/json; charset=utf-16",
                        ]
                    )
                    | _header_value
                ),
            )
        )
    elif kind == "content-encoding":
        codec = draw(st.sampled_from([b"gzip", b"deflate", b"br", b"identity", b"GZIP", b"gzip, deflate", b"x"]))
        packed = draw(st.sampled_from(["real", "garbage", "truncated", "bomb"]))
        if packed == "real":
            body = gzip.compress(body) if codec.lower() == b"gzip" else zlib.compress(body)
        elif packed == "truncated":
            body = gzip.compress(body)[:-8]
        elif packed == "bomb":  # inflates past the body cap
            body = gzip.compress(b"[" + b"0," * (MAX_BODY // 2 + 10) + b"0]")
        else:
            body = draw(st.binary(max_size=100))
        framing = [(b"Content-Length", str(len(body)).encode())]
        extra.append((b"Content-Encoding", codec))
    elif kind == "authorization":
        auth = draw(
            st.sampled_from(
                [
                    [],
                    [(b"Authorization", b"Bearer")],
                    [(b"Authorization", b"Bearer wrong")],
                    [(b"Authorization", b"Basic " + TOKEN.encode())],
                    [(b"Authorization", b"bearer " + TOKEN.encode())],
                    [(b"Authorization", b"Bearer " + TOKEN.encode() + b"x")],
                    [(b"Authorization", b"Bearer \xff\xfe")],
                    [(b"Authorization", b"Bearer " + b"A" * 4000)],
                    [(b"Authorization", b"")],
                ]
            )
            | _header_value.map(lambda v: [(b"Authorization", v)])
        )
    elif kind == "random headers":
        extra.extend(draw(st.lists(st.tuples(_header_name, _header_value), max_size=6)))
    else:
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD", b"BREW"]))
        path = draw(
            st.sampled_from(
                [
                    b"/v2/models/linear/infer",
                    b"/v2",
                    b"/v2/health/ready",
                    b"/metrics",
                    b"/v2/repository/index",
                    b"/v2/models/linear/versions//infer",
                    b"/v2/models/%00/ready",
                    b"/v2/models/../../etc/passwd",
                    b"/v2/models/linear/versions/1.0.0/ready",
                    b"//",
                    b"/v2/models/%ff%fe",
                    b"/v2/models/" + b"a" * 3000,
                    b"/v2/models/linear/infer?x=1&y",
                    b"*",
                ]
            )
            | st.text(max_size=30).map(lambda t: b"/v2/models/" + quote(t, safe="/").encode())
        )
    return kind, method, path, auth + framing + extra, body, half_close


@fuzz_settings(160)
@given(case=_headers_case())
def test_fuzz_headers_methods_paths(fuzz_server: ServerHandle, case) -> None:
    kind, method, path, headers, body, half_close = case
    answer = send_raw(fuzz_server.host, fuzz_server.port, method, path, headers, body, half_close=half_close)
    record(f"headers: {kind}", answer)


def test_counts_were_recorded() -> None:
    """Runs after the fuzz tests of this module (file order): every kind was tried."""
    kinds = {k.split(":")[0] for k in COUNTS}
    assert {"body", "binary", "headers"} <= kinds, COUNTS


@pytest.mark.parametrize(
    ("model", "body", "fragment"),
    [
        (
            "linear",
            b'{"id":"\\ud800","inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}',
            "'id'",
        ),
        ("bytes_echo", b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}', "Unicode"),
        ("dyn", b'{"inputs":[{"name":"x","datatype":"FP32","shape":[0,4611686018427387904],"data":[]}]}', "too large"),
        ("dyn", b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1],"data":[1e300]}]}', "out of range for FP32"),
        (
            "half",
            b'{"inputs":[{"name":"a","datatype":"FP16","shape":[1,8],"data":[1e300,0,0,0,0,0,0,0]},'
            b'{"name":"b","datatype":"FP16","shape":[1,8],"data":[0,0,0,0,0,0,0,0]}]}',
            "out of range for FP16",
        ),
    ],
)
def test_what_fuzzing_found(fuzz_server: ServerHandle, model: str, body: bytes, fragment: str) -> None:
    """Each of these answered 500 before (a lone surrogate in the id or in BYTES data, an empty tensor of
    a shape numpy cannot describe) or silently turned a finite 1e300 into infinity."""
    answer = _post(fuzz_server, model, body)
    assert answer.status == 400 and fragment in json.loads(answer.body)["error"]
