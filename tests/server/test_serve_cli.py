"""`ponder serve` as a process: the API key from $PONDER_API_KEY, and SIGTERM drains then exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_sigterm_drains_and_exits_cleanly(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "ponder.cli", "serve", "--port", str(port), "--drain-timeout", "1",
                             "--num-kv-blocks", "256", "--max-num-seqs", "8"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PONDER_API_KEY": "k3y"})
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        auth = {"Authorization": "Bearer k3y"}
        assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == "smollm2-135m-instruct"

        body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        # more than the drain timeout was left: the stream ends with the reason, then [DONE]
        assert rest[-1] == "data: [DONE]"
        assert '"error"' in rest[-2] and "shutting down" in rest[-2]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = open(tmp_path / "serve.log").read()
    assert "Traceback" not in output, output
