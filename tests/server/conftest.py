"""Servers for the server tests: uvicorn in a thread on a free loopback port (127.0.0.1 only)."""

from __future__ import annotations

import re
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from ponder.config import EngineConfig
from ponder.engine.engine import LLMEngine
from ponder.model.loader import LoadedModel
from ponder.model.tokenizer import Tokenizer
from ponder.server.app import ServerConfig, build_app
from tests.conftest import tiny_config, tiny_model

ANY = object()       # check_error: the error names no particular field


def check_error(response: httpx.Response, field=ANY) -> dict:
    """The OpenAI-shaped error of a 4xx answer, naming `field` (or a path into it) unless ANY."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if field is not ANY:       # the field, or a path into it ("messages.0.role")
        assert error["param"] == field or error["param"].startswith(field + "."), error
    return error


class ServerThread:
    """A running server: `url`, the `app`, and `stop()` (which waits for a clean shutdown)."""

    def __init__(self, engine: LLMEngine | None, config: ServerConfig | None = None, app=None):
        """Serve `engine`, or an `app` already built (over replicas, say)."""
        self.engine = engine
        self.app = app if app is not None else build_app(engine, config)
        self.async_engine = self.app.state.ponder.engine
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                                     timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        assert not self._thread.is_alive(), "the test server did not shut down"

    def metrics(self) -> dict[str, float]:
        """GET /metrics as {'name{other="labels"}': value}, without the model_name label."""
        text = httpx.get(self.url + "/metrics").text
        model_label = re.compile(r',?model_name="[^"]*"')
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                name = model_label.sub("", name).replace("{,", "{").replace("{}", "")
                values[name] = float(value)
        return values


def make_tiny_engine(byte_tokenizer_dir: str, **options) -> LLMEngine:
    cfg = tiny_config()
    loaded = LoadedModel(tiny_model(cfg), cfg, Tokenizer(byte_tokenizer_dir, cfg.eos_token_ids), "tiny")
    options.setdefault("num_kv_blocks", 256)
    options.setdefault("block_size", 4)
    return LLMEngine(EngineConfig(model="tiny", **options), loaded=loaded)


@pytest.fixture
def start_tiny_server(byte_tokenizer_dir):
    """Factory: a server over a fresh tiny random model (byte tokenizer); stopped after the test."""
    servers = []

    def start(config: ServerConfig | None = None, **engine_options) -> ServerThread:
        server = ServerThread(make_tiny_engine(byte_tokenizer_dir, **engine_options), config)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
        server.engine.pool.check_empty()


@pytest.fixture(scope="module")
def tiny_server(byte_tokenizer_dir):
    server = ServerThread(make_tiny_engine(byte_tokenizer_dir, max_model_len=128))
    yield server
    server.stop()
    server.engine.pool.check_empty()


@pytest.fixture(scope="module")
def default_server(default_llm):
    """A server over the packaged default model (the session's engine, shared with other tests)."""
    server = ServerThread(default_llm.engine)
    yield server
    server.stop()
    default_llm.engine.pool.check_empty()
