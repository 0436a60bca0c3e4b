"""OpenAI-compatible HTTP server: `ponder serve`, or build_app(engine) for your own ASGI server."""

from ponder.server.app import ServerConfig, build_app

__all__ = ["ServerConfig", "build_app"]
