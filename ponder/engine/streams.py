"""What callers of the AsyncEngine hold: one `Stream` per submission — engine requests (one per
prompt) or one program — and the errors that end it.

A stream keeps only the newest output of each of its engine requests (outputs are cumulative, so
a slow reader skips intermediate states instead of queueing them) and a program's progress events
(a slow reader gets the newest progress snapshot only) and, at the end, the program's result.
It is fed on the event loop by the engine thread's deliveries.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
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


@dataclass
class ProgramUpdate:
    """What one program did since the last update: progress events, and its result at the end."""

    events: list[dict]
    result: ProgramResult | None = None


@dataclass
class Update:
    """What a reader gets each time its submission progresses."""

    outputs: list[RequestOutput | None] = field(default_factory=list)   # newest per request, in prompt order
    events: list[dict] = field(default_factory=list)                    # a program's events since the last update


class Stream:
    """One submission's updates: `request_ids` are its engine requests, or its program's one id."""

    def __init__(self, request_ids: list[str], program: bool = False):
        self.request_ids = request_ids
        self.program = program
        self.done = False          # every request finished, or the result came; or it failed
        self.result: ProgramResult | None = None
        self._latest: dict[str, RequestOutput] = {}
        self._events: list[dict] = []
        self._result: ProgramResult | None = None
        self._error: BaseException | None = None
        self._changed = asyncio.Event()

    def _receive(self, item: RequestOutput | ProgramUpdate | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = item
        elif isinstance(item, ProgramUpdate):
            for event in item.events:
                if _is_progress(event) and self._events and _is_progress(self._events[-1]):
                    self._events[-1] = event
                else:
                    self._events.append(event)
            if item.result is not None:
                self._result = item.result
        else:
            self._latest[item.request_id] = item
        self._changed.set()

    async def updates(self) -> AsyncIterator[Update]:
        """Yield what changed each time the submission progresses, until it ends (then a
        program's `result` is set). Raises RequestFailed (an engine or program error for this
        request), RequestAborted or EngineDeadError if it ends otherwise."""
        while not self.done:
            await self._changed.wait()
            self._changed.clear()
            if self.program:
                events, self._events = self._events, []
                if events:                 # a program's last events come before how it ended
                    yield Update(events=events)
                self._check_end()
            else:
                self._check_end()
                outputs = [self._latest.get(rid) for rid in self.request_ids]
                failed = next((o for o in outputs if o is not None and o.error), None)
                if failed is not None:
                    self.done = True
                    raise RequestFailed(failed.error)
                self.done = all(o is not None and o.finished for o in outputs)
                yield Update(outputs=outputs)

    def _check_end(self) -> None:
        if self._error is not None:
            self.done = True
            raise self._error
        if self._result is None:
            return
        self.done = True
        if self._result.error == "aborted":
            raise RequestAborted("the request was aborted")
        if self._result.error is not None:
            raise RequestFailed(self._result.error, getattr(self._result, "error_option", None))
        self.result = self._result

    async def final(self) -> ProgramResult | list[RequestOutput]:
        """Wait for the end: a program's result, or the final output of each request."""
        last = Update()
        async for last in self.updates():
            pass
        return self.result if self.program else last.outputs


def _is_progress(event: dict) -> bool:
    return event.get("event") == "progress"
