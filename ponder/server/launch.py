"""Run the server: load the engine, then uvicorn until SIGTERM / SIGINT, draining on the way out.

On the signal uvicorn stops accepting connections, and the engine stops admitting requests and
gives those in flight up to `drain_timeout` seconds to finish; what is left is then aborted (each
open stream ends with an error event and [DONE]), the engine thread stops and the process exits.
"""

from __future__ import annotations

from types import FrameType

import uvicorn

from ponder.config import EngineConfig
from ponder.engine.engine_thread import EngineThread
from ponder.engine.engine import LLMEngine
from ponder.server.app import ServerConfig, build_app


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that also tells the engine to drain when it is asked to exit."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self._on_exit()
        super().handle_exit(sig, frame)


def serve(model: str | None, engine_options: dict, config: ServerConfig) -> None:
    """Load the model and serve it until a shutdown signal."""
    engine_thread = EngineThread()     # loads the model, then runs the engine loop (see EngineThread)
    engine = engine_thread.call(lambda: LLMEngine(EngineConfig.from_options(model, **engine_options)))
    app = build_app(engine, config, engine_thread)
    async_engine = app.state.ponder.engine
    run_server(app, config, lambda: async_engine.request_drain(config.drain_timeout))


def run_server(app, config: ServerConfig, on_exit) -> None:
    """Serve `app` with uvicorn until a shutdown signal; `on_exit` (thread- and signal-safe) starts
    the engine's drain when the signal comes."""
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                               access_log=config.access_log, lifespan="on",
                               # uvicorn's own backstop, past our drain (which aborts what is left)
                               timeout_graceful_shutdown=config.drain_timeout + 5)
    _DrainingServer(uv_config, on_exit).run()
