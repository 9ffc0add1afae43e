"""``edgepack serve`` as a user runs it: listens at once, ready once its bundle is installed; refuses to
listen beyond loopback without a token; serves on a Unix socket too; stops on SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.agent_api.test_listen import UnixHTTPConnection
from tests.models import linear_bundle

EDGEPACK = [sys.executable, "-m", "edgepack.cli"]


def _unix_and_bound(sock: Path) -> list[str]:
    return ["--listen-unix", str(sock), "--max-concurrent-requests", "2"]


def _edgepack() -> list[str]:
    script = Path(sys.executable).with_name("edgepack")
    return [str(script)] if script.exists() else EDGEPACK


def test_serve_refuses_all_interfaces_without_a_token(tmp_path, keyring, trust) -> None:
    bundle, _ = linear_bundle(tmp_path, keyring.keys["release"])
    done = subprocess.run(
        [*_edgepack(), "serve", str(bundle), "--trust", str(trust.directory), "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert done.returncode == 1
    assert "refusing to listen on 0.0.0.0:0 without a token" in done.stderr and "--insecure-listen" in done.stderr


def test_serve_becomes_ready_and_serves_on_tcp_and_unix(tmp_path, keyring, trust) -> None:
    bundle, _ = linear_bundle(tmp_path, keyring.keys["release"])
    sock = tmp_path / "api.sock"
    process = subprocess.Popen(
        [*_edgepack(), "serve", str(bundle), "--trust", str(trust.directory), "--port", "0", *_unix_and_bound(sock)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        deadline = time.monotonic() + 120
        while "serving" not in line:
            assert line or process.poll() is None, "edgepack serve exited early"
            assert time.monotonic() < deadline, "edgepack serve did not report serving"
            line = process.stderr.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().status == 200
        conn.close()
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
        unix = UnixHTTPConnection(sock)
        unix.request("POST", "/v2/models/linear/infer", body=body)
        answer = unix.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["model_version"] == "1.0.0"
        unix.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert not sock.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
