"""Where the API listens: beyond loopback only with a token or --insecure-listen; a Unix-domain socket
listener, served by the same app (tritonclient has no AF_UNIX transport, so http.client talks to it)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
from pathlib import Path

import numpy as np
import pytest

from edgepack.agent.api import ApiMetrics, start_in_thread
from edgepack.agent.api.server import check_listen
from edgepack.agent.api.static_repository import StaticRepository
from edgepack.agent.config import load_config
from edgepack.agent.service import DeviceAgent
from edgepack.errors import ConfigError
from tests.agent_api.fakes import linear, make_models
from tests.agent_api.helpers import raw


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix-domain socket."""

    def __init__(self, path: Path, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _unix(path: Path, method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(path)
    try:
        conn.request(method, url, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
def repository() -> StaticRepository:
    return StaticRepository(make_models())


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "device.local"])
def test_beyond_loopback_without_a_token_is_refused(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_listen(host, 8000, None, False)
    message = str(info.value)
    assert host in message and "--token" in message and "--insecure-listen" in message
    assert "insecure_listen = true" in message and "token = " in message
    check_listen(host, 8000, "s3cret", False)  # a token: allowed
    check_listen(host, 8000, None, True)  # said out loud: allowed


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.1", "::1", "localhost"])
def test_loopback_needs_no_token(host: str) -> None:
    check_listen(host, 8000, None, False)


def test_server_refuses_to_bind_all_interfaces_without_a_token(repository) -> None:
    with pytest.raises(ConfigError, match=r"0\.0\.0\.0:0"):
        start_in_thread(repository, host="0.0.0.0", port=0)
    handle = start_in_thread(repository, host="0.0.0.0", port=0, insecure_listen=True)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
        conn.request("GET", "/v2/health/live")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        handle.stop()


def test_agent_config_insecure_listen(tmp_path, trust) -> None:
    base = {"state_dir": str(tmp_path / "state"), "trust_dir": str(trust.directory), "listen": "0.0.0.0:0"}
    agent = DeviceAgent(load_config(None, base))
    try:
        with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0:0 without a token"):
            agent.start_api()
    finally:
        agent.close()
    agent = DeviceAgent(load_config(None, {**base, "insecure_listen": True}))
    try:
        assert agent.start_api().port > 0
    finally:
        agent.close()


def test_unix_socket_serves_the_same_app(repository, tmp_path) -> None:
    path = tmp_path / "api.sock"
    metrics = ApiMetrics()
    handle = start_in_thread(repository, port=0, unix_path=path, metrics=metrics)
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert _unix(path, "GET", "/v2/health/live") == (200, b'{"live":true}')
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x.ravel().tolist()}]})
        status, answer = _unix(path, "POST", "/v2/models/linear/infer", body.encode())
        assert status == 200
        y = next(o for o in json.loads(answer)["outputs"] if o["name"] == "y")
        np.testing.assert_allclose(np.array(y["data"]).reshape(2, 3), linear(x)["y"], rtol=1e-6)
        assert raw(handle, "POST", "/v2/models/linear/infer", body.encode())[0] == 200  # and over TCP
        status, text = _unix(path, "GET", "/metrics")
        assert status == 200 and 'edgepack_inference_requests_total{model="linear",outcome="ok"} 2.0' in text.decode()
    finally:
        handle.stop()
    assert not path.exists()  # removed on the way out


def test_unix_socket_mode_stale_file_and_refusals(repository, tmp_path) -> None:
    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a socket file nobody listens on, as a killed server leaves it
    stale.close()
    handle = start_in_thread(repository, port=0, unix_path=path, unix_mode=0o660)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert _unix(path, "GET", "/v2/health/live")[0] == 200
        with pytest.raises(ConfigError, match="another server is listening"):
            start_in_thread(repository, port=0, unix_path=path)
    finally:
        handle.stop()
    regular = tmp_path / "not-a-socket"
    regular.write_text("keep me")
    with pytest.raises(ConfigError, match="is not a socket"):
        start_in_thread(repository, port=0, unix_path=regular)
    assert regular.read_text() == "keep me"
    with pytest.raises(ConfigError, match="mode 0666 without a token"):
        start_in_thread(repository, port=0, unix_path=tmp_path / "open.sock", unix_mode=0o666)
    with pytest.raises(ConfigError, match="cannot listen on the Unix socket"):
        start_in_thread(repository, port=0, unix_path=tmp_path / "missing-dir" / "api.sock")
