"""A request in the engine answered over HTTP: whole (aborted if the client disconnects first), or as
server-sent events (aborted when the client goes away); and the HTTP error for a request the engine
could not finish."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from fastapi import Request

from ponder.engine.async_engine import AsyncEngine
from ponder.engine.streams import EngineDeadError, EngineUnavailable, RequestAborted, RequestFailed, Stream
from ponder.outputs import RequestOutput
from ponder.server.errors import APIError, dumps, invalid
from ponder.server.responses import DeltaTracker, Renderer, usage
from ponder.server.think import ThinkRenderer, param_of


def api_error(exc: Exception) -> APIError:
    """The HTTP error for a request the engine could not finish."""
    if isinstance(exc, EngineUnavailable):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return APIError(503, str(exc), code="server_overloaded" if exc.retry_after else "unavailable",
                        headers=headers)
    if isinstance(exc, RequestAborted):
        return APIError(503, f"The request was aborted: {exc}", code="aborted")
    if isinstance(exc, RequestFailed):
        return invalid(str(exc))
    return APIError(500, str(exc))


@dataclass
class Generation:
    """One request's engine stream rendered as OpenAI JSON: whole, or as server-sent events."""

    stream: Stream
    tracker: DeltaTracker
    renderer: Renderer
    num_choices: int
    include_usage: bool
    engine: AsyncEngine
    prompt_tokens: int | None = None   # set: usage in every chunk (continuous_usage_stats)

    async def complete(self, request: Request) -> dict:
        """The whole response; the requests are aborted at once if the client disconnects first."""
        try:
            outs = await _unless_disconnected(self.stream.final(), request, self._abort_unless_done)
        except (RequestFailed, RequestAborted, EngineDeadError) as e:
            raise api_error(e) from None
        return self.renderer.response(self.tracker.deltas(outs), usage(outs))

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events, one write per engine step; the requests are aborted if the client
        goes away (Starlette cancels this generator when it sees the disconnect)."""
        render = self.renderer
        try:
            opening = render.opening_chunks(self.num_choices, self.include_usage, self._usage([]))
            if opening:
                yield _events(opening)
            outs: list[RequestOutput] = []
            async for update in self.stream.updates():
                outs = update.outputs
                deltas = self.tracker.deltas(outs)
                if deltas:
                    so_far = self._usage(outs)
                    yield _events([render.chunk([choice], self.include_usage, so_far)
                                   for d in deltas for choice in render.stream_choices(d)])
            closing = render.closing_chunks(self.include_usage, usage(outs))
            if closing:
                yield _events(closing)
        except (RequestFailed, RequestAborted, EngineDeadError) as e:
            yield _events([api_error(e).body()])
        finally:
            self._abort_unless_done()
        if render.done_marker:
            yield render.done_marker

    def _usage(self, outs: list[RequestOutput]) -> dict | None:
        """The usage so far, for every chunk when continuous usage is on (else None)."""
        if self.prompt_tokens is None:
            return None
        return usage(outs) if outs else {"prompt_tokens": self.prompt_tokens, "completion_tokens": 0,
                                         "total_tokens": self.prompt_tokens}

    def _abort_unless_done(self) -> None:
        if not self.stream.done:
            self.engine.abort(self.stream.request_ids)


async def _unless_disconnected(work, request: Request, abort: Callable[[], None]):
    """The result of `work`, unless the client disconnects first (then a 499). `abort` runs
    either way (a no-op once the work is done), so a vanished client's blocks are freed at once."""
    final = asyncio.ensure_future(work)
    disconnect = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({final, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        final.cancel()
        abort()
    if not final.done() or final.cancelled():
        raise APIError(499, "The client disconnected")
    return final.result()


@dataclass
class ThinkGeneration:
    """One think request rendered as OpenAI JSON: whole, or as server-sent events with progress."""

    stream: Stream
    renderer: ThinkRenderer
    engine: AsyncEngine
    options: dict

    def _error(self, exc: Exception) -> APIError:
        if isinstance(exc, RequestFailed):     # the strategy failed: name the option at fault if it can
            return invalid(str(exc), param_of(exc, self.options))
        return api_error(exc)

    async def complete(self, request: Request) -> dict:
        """The whole response; the run is aborted at once (its branches freed) if the client
        disconnects first."""
        try:
            result = await _unless_disconnected(self.stream.final(), request, self._abort_unless_done)
        except (RequestFailed, RequestAborted, EngineDeadError) as e:
            raise self._error(e) from None
        return self.renderer.response(result)

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events: the role chunk, progress chunks as the strategy runs, then the
        answer; the run is aborted if the client goes away."""
        render = self.renderer
        try:
            yield _events(render.opening_chunks())
            async for update in self.stream.updates():
                yield _events([render.progress_chunk(e) for e in update.events])
            yield _events(render.final_chunks(self.stream.result))
        except (RequestFailed, RequestAborted, EngineDeadError) as e:
            yield _events([self._error(e).body()])
        finally:
            self._abort_unless_done()
        yield "data: [DONE]\n\n"

    def _abort_unless_done(self) -> None:
        if not self.stream.done:
            self.engine.abort(self.stream.request_ids)


def _events(bodies: list[dict]) -> str:
    """Server-sent events; a typed event (the Responses API's) also names itself on an event line."""
    return "".join(f"event: {body['type']}\ndata: {dumps(body)}\n\n" if isinstance(body.get("type"), str)
                   else f"data: {dumps(body)}\n\n" for body in bodies)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
