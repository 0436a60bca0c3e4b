"""Programs: work that spans many engine steps and acts on the engine between them.

A think strategy is a program (it forks branches, steps, scores and prunes them); plain requests
are one too (`RequestsProgram`); the engine knows no strategy. Whoever drives an engine — `LLM.think`, the CLI, the async engine of the server —
advances its programs through this protocol with the one loop below, which owns the "nothing can
progress" watchdog: a program still waiting while the engine has nothing left to run would wait
forever, so it is aborted with an error, and the engine and the other programs go on.

A program is created on the engine's thread by a factory, `factory(engine) -> Program`, built
from a plain description (for think: the strategy name, its options and the prompt), so another
process can start the same program from the same description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol

from ponder.outputs import RequestOutput

if TYPE_CHECKING:
    from ponder.engine.engine import LLMEngine
    from ponder.engine.sequence import Request

STALLED = "the program waits on sequences the engine is not running"


class ProgramResult(Protocol):
    error: str | None          # None on success; "aborted" when stopped from outside


class Program(Protocol):
    request_id: str
    result: ProgramResult | None   # set once the program has ended

    def advance(self) -> bool:
        """Act on the last engine step's results; True once `result` is set."""

    def abort(self) -> None:
        """Stop now and free every sequence it holds; sets `result` (error "aborted")."""

    def drain_events(self) -> list[dict]:
        """Progress events since the last call, for streaming."""

    def progress(self) -> dict:
        """A snapshot of where the program stands, for streaming."""


ProgramFactory = Callable[["LLMEngine"], Program]


def advance_programs(engine: "LLMEngine", programs: Iterable[Program]) -> list[Program]:
    """Advance every program once, after an engine step; returns those that have ended."""
    ended = []
    for program in programs:
        done = program.advance()
        if not done and not engine.scheduler.has_work:
            program.abort()
            program.result.error = STALLED
            done = True
        if done:
            ended.append(program)
    return ended


def run_programs(engine: "LLMEngine", programs: list[Program]) -> None:
    """Offline: advance the programs and step the engine until every one has ended. The caller
    must be the engine's only driver. Whatever stops this early aborts the programs still live."""
    for _ in iterate_programs(engine, programs):
        pass


def iterate_programs(engine: "LLMEngine", programs: list[Program]) -> Iterator[None]:
    """`run_programs`, yielding after every engine step (to stream, or show progress). Closing
    the iterator early aborts the programs still live."""
    live = list(programs)
    try:
        while live:
            ended = advance_programs(engine, live)
            live = [p for p in live if p not in ended]
            if live:
                engine.step()
                yield
    finally:
        for program in live:
            program.abort()


@dataclass
class RequestsResult:
    outputs: list[RequestOutput] = field(default_factory=list)
    error: str | None = None


class RequestsProgram:
    """Plain engine requests as a program: it ends when every one has finished (or failed);
    `result.outputs` are their final outputs, in order. Aborting it aborts them."""

    def __init__(self, engine: "LLMEngine", requests: list["Request"], request_id: str = ""):
        self.engine, self.requests, self.request_id = engine, list(requests), request_id
        self.result: RequestsResult | None = None

    def advance(self) -> bool:
        if self.result is None and all(r.finished for r in self.requests):
            self.result = RequestsResult([r.output() for r in self.requests])
        return self.result is not None

    def abort(self) -> None:
        for r in self.requests:
            self.engine.abort_request(r.request_id)
        if self.result is None:
            self.result = RequestsResult([r.output() for r in self.requests], error="aborted")

    def drain_events(self) -> list[dict]:
        return []

    def progress(self) -> dict:
        return {}
