"""The async engine's messages: commands the event loop queues for the engine thread, what the
thread keeps per request and program, what one step did, and how its results travel back to the
event loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

from ponder.engine.handoff import Handoff
from ponder.engine.programs import Program, ProgramFactory
from ponder.engine.streams import ProgramUpdate, Stream
from ponder.outputs import RequestOutput
from ponder.sampling_params import SamplingParams


@dataclass
class Add:
    request_ids: list[str]
    prompts: list[list[int]]
    params: SamplingParams
    stream: Stream
    arrival: float
    future: asyncio.Future
    prefill_only: bool = False       # run to the first token, then hold the KV (engine/handoff.py)
    handoff: Handoff | None = None   # continue this hand-off instead (one request; prompts ignored)


@dataclass
class Start:
    request_id: str
    factory: ProgramFactory
    stream: Stream
    arrival: float
    future: asyncio.Future


@dataclass
class Call:
    """Run `fn(engine)` between two steps; its result (or exception) settles `future`."""

    fn: Callable[[Any], Any]
    future: asyncio.Future


@dataclass
class Abort:
    request_ids: list[str] | None    # None: every request
    reason: str


@dataclass
class Stop:
    reason: str


@dataclass
class StepReport:
    """What one engine step did, for metrics. Built on the engine thread."""

    duration: float                  # seconds inside LLMEngine.step()
    num_sampled: int                 # sequences that got a token this step (the decode batch)
    num_tokens: int                  # prompt and generated tokens computed this step
    stats: dict                      # engine stats after the step
    ttfts: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[tuple[str, float]] = field(default_factory=list)   # (finish reason, e2e seconds)


@dataclass
class Tracked:
    """Engine-thread view of one engine request: where its outputs go, and its token timing."""

    stream: Stream
    arrival: float
    last_token: float | None = None  # a hand-off arrives with its first token: timed from arrival
    num_tokens: int = 0

    def time_tokens(self, out: RequestOutput, now: float, report: StepReport) -> None:
        """Record in `report` the time to this request's first token, or since its last one."""
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        if num_tokens <= self.num_tokens:
            return
        if self.last_token is None:
            report.ttfts.append(now - self.arrival)
        else:
            report.inter_token_latencies.append(now - self.last_token)
        self.last_token, self.num_tokens = now, num_tokens


@dataclass
class LiveProgram:
    """Engine-thread view of one program: where its updates go, and when it last reported."""

    program: Program
    stream: Stream
    arrival: float
    progress_key: tuple | None = None    # (alive, finished) of the last progress event sent
    progress_at: float = 0.0
    progress_tokens: int = -1


Delivery = tuple[Stream, RequestOutput | ProgramUpdate | BaseException]
Settlement = tuple[asyncio.Future, BaseException | None, Any]   # (future, error, result)


def settle(settlements: list[Settlement], deliveries: list[Delivery]) -> None:
    """On the event loop: resolve add and call futures and hand outputs to their streams."""
    for future, error, result in settlements:
        if future.done():             # the caller went away meanwhile
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    for stream, item in deliveries:
        stream._receive(item)
