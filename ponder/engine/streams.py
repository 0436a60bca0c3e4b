"""What callers of the AsyncEngine hold: one stream per request (or program), and the errors
that end them.

A RequestStream keeps only the newest output of each of its engine requests: outputs are
cumulative, so a slow reader skips intermediate states instead of queueing them. A ProgramStream
collects a program's progress events (a slow reader gets the newest progress snapshot only) and,
at the end, its result. Both are fed on the event loop by the engine thread's deliveries.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from ponder.engine.programs import ProgramResult
from ponder.outputs import RequestOutput


class EngineUnavailable(Exception):
    """The engine cannot take a request now: overloaded (retry later) or shutting down."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can be served any more."""


class RequestAborted(Exception):
    """The request was aborted before it finished (for example, the server is shutting down)."""


class RequestFailed(Exception):
    """The engine ended the request with an error of its own (the message says which; `option`
    names the option at fault when the error is about one)."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class _Stream:
    """What every stream shares: its request ids, whether it has ended, the error that ended it,
    and the event its reader waits on. Deliveries arrive through `_receive` on the event loop."""

    def __init__(self, request_ids: list[str]):
        self.request_ids = request_ids
        self.done = False
        self._error: BaseException | None = None
        self._changed = asyncio.Event()

    def _receive(self, item) -> None:
        if isinstance(item, BaseException):
            self._error = item
        else:
            self._take(item)
        self._changed.set()

    def _take(self, item) -> None:
        raise NotImplementedError


class RequestStream(_Stream):
    """The outputs of one caller's engine requests (one per prompt), newest only."""

    def __init__(self, request_ids: list[str]):
        super().__init__(request_ids)      # done: every request finished, failed or was aborted
        self._latest: dict[str, RequestOutput] = {}

    def _take(self, item: RequestOutput) -> None:
        self._latest[item.request_id] = item

    async def updates(self) -> AsyncIterator[list[RequestOutput | None]]:
        """Yield the newest output of each request (in prompt order; None before its first) each
        time one progresses, until all have finished. Raises RequestFailed, RequestAborted or
        EngineDeadError if the requests end otherwise."""
        while not self.done:
            await self._changed.wait()
            self._changed.clear()
            if self._error is not None:
                self.done = True
                raise self._error
            outs = [self._latest.get(rid) for rid in self.request_ids]
            failed = next((o for o in outs if o is not None and o.error), None)
            if failed is not None:
                self.done = True
                raise RequestFailed(failed.error)
            self.done = all(o is not None and o.finished for o in outs)
            yield outs


@dataclass
class ProgramUpdate:
    """What one program did since the last update: progress events, and its result at the end."""

    events: list[dict]
    result: ProgramResult | None = None


class ProgramStream(_Stream):
    """Progress events and the result of one program (see `AsyncEngine.start_program`)."""

    def __init__(self, request_id: str):
        super().__init__([request_id])     # done: the result came, or the program failed or was aborted
        self.result: ProgramResult | None = None
        self._events: list[dict] = []
        self._result: ProgramResult | None = None

    def _take(self, item: ProgramUpdate) -> None:
        for event in item.events:          # a slow reader gets the newest snapshot only
            if _is_progress(event) and self._events and _is_progress(self._events[-1]):
                self._events[-1] = event
            else:
                self._events.append(event)
        if item.result is not None:
            self._result = item.result

    async def updates(self) -> AsyncIterator[list[dict]]:
        """Yield the progress events that came since the last yield, until the program ends; then
        `result` is set. Raises RequestFailed (the program or the engine failed this request),
        RequestAborted or EngineDeadError if it ends otherwise."""
        while not self.done:
            await self._changed.wait()
            self._changed.clear()
            events, self._events = self._events, []
            if events:
                yield events
            if self._error is not None:
                self.done = True
                raise self._error
            if self._result is not None:
                self.done = True
                if self._result.error == "aborted":
                    raise RequestAborted("the request was aborted")
                if self._result.error is not None:
                    raise RequestFailed(self._result.error, getattr(self._result, "error_option", None))
                self.result = self._result

    async def final(self) -> ProgramResult:
        """Wait for the result (progress events are dropped)."""
        async for _ in self.updates():
            pass
        return self.result


def _is_progress(event: dict) -> bool:
    return event.get("event") == "progress"
