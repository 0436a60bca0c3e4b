"""X-Request-Id on every answer: the client's own, echoed, or a fresh one, so that a client, a proxy
and the server's logs can name the same request.

Pure ASGI (it wraps `send` and adds the header to the answer's first message), so streamed answers
get it like any other: Starlette's BaseHTTPMiddleware would buffer and re-wrap the stream. The one
answer Starlette sends from outside every middleware, the 500 of an unhandled error, reads the id
from the request's state (see request_id_headers).
"""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-Id"
_HEADER = HEADER.lower().encode()


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == _HEADER), None)
        request_id = given or uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (_HEADER, request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id_headers(request: Request) -> dict[str, str]:
    """The X-Request-Id header for an answer built outside RequestIdMiddleware (none if it did not run)."""
    request_id = getattr(request.state, "request_id", None)
    return {HEADER: request_id} if request_id else {}
