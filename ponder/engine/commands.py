"""The async engine's messages: commands the event loop queues for the engine thread, what the
thread keeps per request and program, and how its results travel back to the event loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

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


@dataclass
class Start:
    request_id: str
    factory: ProgramFactory
    stream: Stream
    arrival: float
    future: asyncio.Future


@dataclass
class Abort:
    request_ids: list[str] | None    # None: every request
    reason: str


@dataclass
class Stop:
    reason: str


@dataclass
class Tracked:
    """Engine-thread view of one engine request: where its outputs go, and its token timing."""

    stream: Stream
    arrival: float
    last_token: float | None = None
    num_tokens: int = 0


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
Settlement = tuple[asyncio.Future, BaseException | None]


def settle(settlements: list[Settlement], deliveries: list[Delivery]) -> None:
    """On the event loop: resolve add futures and hand outputs to their streams."""
    for future, error in settlements:
        if future.done():             # the caller went away meanwhile
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    for stream, item in deliveries:
        stream._receive(item)
