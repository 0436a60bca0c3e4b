"""AsyncEngine: one background thread drives LLMEngine.step(); each request gets its own stream.

The LLMEngine is not thread-safe, so only the engine thread touches it. The event loop sends it
commands (add, abort, stop) through a thread-safe queue, applied between steps. Results go back to
the loop in one `call_soon_threadsafe` per step, whatever the number of requests. A stream keeps
only the newest output of each of its engine requests: outputs are cumulative, so a slow reader
skips intermediate states instead of queueing them. With no work the thread blocks on the queue.

Programs (`start_program`, ponder/engine/programs.py — a think strategy is one) run on the same
thread: after every engine step each live program advances (forks, scores, prunes, ...), and its
progress events and, at the end, its result go to a `ProgramStream`. The thread never blocks
while a program is live, even when the scheduler is idle between two of its phases. The async
engine knows no strategy: it is handed a factory that builds the program on the engine thread.

Admission is bounded: past `max_waiting_requests` requests that would have to wait, `add` (and
`start_program`, which counts as one request) raises EngineUnavailable (an HTTP server answers 503 with
Retry-After) instead of queueing without end.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from ponder.engine.engine import LLMEngine
from ponder.engine.programs import Program, ProgramFactory, ProgramResult, advance_programs
from ponder.outputs import RequestOutput
from ponder.sampling_params import SamplingParams

logger = logging.getLogger("ponder.engine")

SHUTDOWN_REASON = "the server is shutting down"


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
    """The engine ended the request with an error of its own (the message says which)."""


class RequestStream:
    """The outputs of one caller's engine requests (one per prompt), newest only."""

    def __init__(self, request_ids: list[str]):
        self.request_ids = request_ids
        self.done = False              # every request finished, failed or was aborted
        self._latest: dict[str, RequestOutput] = {}
        self._error: BaseException | None = None
        self._changed = asyncio.Event()

    def _receive(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = item
        else:
            self._latest[item.request_id] = item
        self._changed.set()

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


class ProgramStream:
    """Progress events and the result of one program (see `AsyncEngine.start_program`)."""

    def __init__(self, request_id: str):
        self.request_ids = [request_id]
        self.done = False              # the result came, or the program failed or was aborted
        self.result: ProgramResult | None = None
        self._events: list[dict] = []
        self._result: ProgramResult | None = None
        self._error: BaseException | None = None
        self._changed = asyncio.Event()

    def _receive(self, item: ProgramUpdate | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = item
        else:
            for event in item.events:      # a slow reader gets the newest snapshot only
                if _is_progress(event) and self._events and _is_progress(self._events[-1]):
                    self._events[-1] = event
                else:
                    self._events.append(event)
            if item.result is not None:
                self._result = item.result
        self._changed.set()

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
                    raise RequestFailed(self._result.error)
                self.result = self._result

    async def final(self) -> ProgramResult:
        """Wait for the result (progress events are dropped)."""
        async for _ in self.updates():
            pass
        return self.result


def _is_progress(event: dict) -> bool:
    return event.get("event") == "progress"


class EngineThread:
    """One long-lived thread that builds the engine and later runs its loop, so that every torch
    op and native kernel of the engine has the same OpenMP master thread.

    GNU OpenMP keeps a thread team per master thread. If the model loads on the main thread and
    the loop runs on another, a 2-core machine carries more OpenMP threads than cores, and libgomp
    then throttles its spin-waits: every parallel region of the loop ran ~1.5x slower, and
    single-stream decode in the server fell to 20 tok/s against 35 offline (measured here).
    """

    def __init__(self, name: str = "ponder-engine"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def call(self, fn: Callable, *args, **kwargs):
        """Run fn on the engine thread and return its result (e.g. build the LLMEngine)."""
        return self._executor.submit(fn, *args, **kwargs).result()

    def submit(self, fn: Callable) -> Future:
        return self._executor.submit(fn)


class _LoopOnEngineThread:
    """The start/join/is_alive of a threading.Thread, for the loop run on an EngineThread."""

    def __init__(self, engine_thread: EngineThread, target: Callable[[], None]):
        self._engine_thread, self._target = engine_thread, target
        self._future: Future | None = None

    def start(self) -> None:
        self._future = self._engine_thread.submit(self._target)

    def join(self) -> None:
        if self._future is not None:
            futures_wait([self._future])

    def is_alive(self) -> bool:
        return self._future is not None and not self._future.done()


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
class _Add:
    request_ids: list[str]
    prompts: list[list[int]]
    params: SamplingParams
    stream: RequestStream
    arrival: float
    future: asyncio.Future


@dataclass
class _Start:
    request_id: str
    factory: ProgramFactory
    stream: ProgramStream
    arrival: float
    future: asyncio.Future


@dataclass
class _Abort:
    request_ids: list[str] | None    # None: every request
    reason: str


@dataclass
class _Stop:
    reason: str


@dataclass
class _Tracked:
    """Engine-thread view of one engine request: where its outputs go, and its token timing."""

    stream: RequestStream
    arrival: float
    last_token: float | None = None
    num_tokens: int = 0


@dataclass
class _LiveProgram:
    """Engine-thread view of one program: where its updates go, and when it last reported."""

    program: Program
    stream: ProgramStream
    arrival: float
    progress_key: tuple | None = None    # (alive, finished) of the last progress event sent
    progress_at: float = 0.0
    progress_tokens: int = -1


Delivery = tuple["RequestStream | ProgramStream", "RequestOutput | ProgramUpdate | BaseException"]
Settlement = tuple[asyncio.Future, "BaseException | None"]


class AsyncEngine:
    """Serve an LLMEngine to asyncio code: `stream = await add(...)`, then `stream.updates()`;
    `stream = await start_program(factory, ...)` for a program (a think strategy, say)."""

    progress_interval = 0.5     # seconds between progress events of a program whose branches
                                # only grow (any change in branches alive or finished is sent at once)

    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None,
                 on_step: Callable[[StepReport], None] | None = None, engine_thread: EngineThread | None = None):
        """engine_thread: the thread that built `engine`, to run the loop on (see EngineThread);
        without it the loop gets a thread of its own."""
        if max_waiting_requests is not None and max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {max_waiting_requests}")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self._on_step = on_step
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()           # orders "enqueue an add" against "the loop died"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine_thread = engine_thread
        self._thread: threading.Thread | _LoopOnEngineThread | None = None
        self._drain_task: asyncio.Task | None = None
        self._accepting = False
        self._num_submitted = 0                 # prompts handed to the thread (event-loop side)
        self.error: BaseException | None = None
        # engine-thread state
        self._tracked: dict[str, _Tracked] = {}
        self._programs: dict[str, _LiveProgram] = {}   # live programs by request id
        self._num_added = 0                     # prompts the thread has taken (added or refused)
        self._stats = self._snapshot()

    # -- lifecycle (event loop) -----------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will await this engine."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        if self._engine_thread is None:
            self._thread = threading.Thread(target=self._run, name="ponder-engine", daemon=True)
        else:
            self._thread = _LoopOnEngineThread(self._engine_thread, self._run)
        self._thread.start()

    async def drain(self, timeout: float) -> None:
        """Stop admitting requests, let those in flight finish for up to `timeout` seconds, then
        abort the rest (their streams raise RequestAborted)."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.num_in_flight:
            self._commands.put(_Abort(None, SHUTDOWN_REASON))

    def request_drain(self, timeout: float) -> None:
        """Thread- and signal-safe: schedule `drain(timeout)` on the engine's event loop."""
        def start_drain() -> None:
            self._drain_task = self._loop.create_task(self.drain(timeout))

        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(start_drain)

    async def shutdown(self) -> None:
        """Abort whatever is in flight, stop the engine thread and wait for it."""
        with self._lock:           # no add can slip in behind the stop command
            self._accepting = False
            if self._thread is None:
                return
            self._commands.put(_Stop(SHUTDOWN_REASON))
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # -- requests (event loop) ------------------------------------------------------------------
    async def add(self, prompts: list[list[int]], params: SamplingParams, request_id: str) -> RequestStream:
        """Queue one engine request per prompt (ids `{request_id}-{i}`) sharing `params`.

        Raises ValueError (a prompt the engine refuses; none of them is queued then),
        EngineUnavailable (overloaded or shutting down) or EngineDeadError.
        """
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        stream = RequestStream(ids)
        with self._lock:
            self._admit(len(prompts))
            future = self._loop.create_future()
            self._num_submitted += len(prompts)
            self._commands.put(_Add(ids, prompts, params, stream, time.monotonic(), future))
        try:
            await future
        except asyncio.CancelledError:
            self.abort(ids)
            raise
        return stream

    async def start_program(self, factory: ProgramFactory, request_id: str) -> ProgramStream:
        """Start the program `factory(engine)` builds (on the engine thread; for a think request,
        ponder.think.run.think_program). Counts as one request for admission and in flight.

        Raises ValueError (the factory refused its description or prompt; nothing runs then),
        RequestFailed (the factory failed otherwise), EngineUnavailable or EngineDeadError.
        """
        stream = ProgramStream(request_id)
        with self._lock:
            self._admit(1)
            future = self._loop.create_future()
            self._num_submitted += 1
            self._commands.put(_Start(request_id, factory, stream, time.monotonic(), future))
        try:
            await future
        except asyncio.CancelledError:
            self.abort([request_id])
            raise
        return stream

    def abort(self, request_ids: list[str], reason: str = "aborted by the client") -> None:
        """Abort requests (non-blocking); unknown or finished ids are ignored."""
        self._commands.put(_Abort(list(request_ids), reason))

    def _admit(self, count: int) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine has failed: {self.error!r}")
        if not self._accepting:
            raise EngineUnavailable(SHUTDOWN_REASON if self._thread is not None else "the engine is not started")
        if self.max_waiting_requests is None:
            return
        stats = self._stats
        queued = stats["num_waiting"] + self._num_submitted - stats["requests_added"]
        free_slots = max(0, self.engine.config.max_num_seqs - stats["num_running"])
        would_wait = max(0, queued + count - free_slots)
        if would_wait > self.max_waiting_requests:
            raise EngineUnavailable(f"the server is overloaded: {queued} requests are already waiting "
                                    f"(limit {self.max_waiting_requests}); retry later", retry_after=1)

    # -- observation (any thread) ---------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Engine stats as of the last step or command, plus requests_added and requests_in_flight."""
        return self._stats

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not yet finished."""
        stats = self._stats
        return stats["requests_in_flight"] + self._num_submitted - stats["requests_added"]

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except Exception as exc:   # a bug in the engine: fail every request loudly and stay down
            logger.exception("the engine loop failed; failing every request")
            self._die(exc)

    def _iterate(self) -> bool:
        # a live program must be advanced even if its engine request is gone (it then ends)
        idle = not self.engine.has_unfinished_requests() and not self._programs
        commands = self._take_commands(block=idle)
        if commands and not self._apply(commands):
            return False
        if self.engine.has_unfinished_requests() or self._programs:
            self._step()
        return True

    def _take_commands(self, block: bool) -> list:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands: list) -> bool:
        """Apply queued commands; False once told to stop (everything is aborted then)."""
        settlements: list[Settlement] = []
        deliveries: list[Delivery] = []
        keep_running = True
        for cmd in commands:
            if isinstance(cmd, _Add):
                settlements.append((cmd.future, self._add(cmd)))
            elif isinstance(cmd, _Start):
                settlements.append((cmd.future, self._start_program(cmd)))
            elif isinstance(cmd, _Abort):
                self._abort(cmd.request_ids, RequestAborted(cmd.reason), deliveries)
            else:
                self._abort(None, RequestAborted(cmd.reason), deliveries)
                keep_running = False
        self._stats = self._snapshot()      # before callers learn their add went through
        self._send(settlements, deliveries)
        return keep_running

    def _add(self, cmd: _Add) -> ValueError | None:
        added = []
        self._num_added += len(cmd.prompts)
        try:
            for rid, prompt in zip(cmd.request_ids, cmd.prompts):
                self.engine.add_request(prompt, cmd.params, request_id=rid)
                added.append(rid)
        except ValueError as e:
            for rid in added:
                self.engine.abort_request(rid)
            return e
        for rid in added:
            self._tracked[rid] = _Tracked(cmd.stream, cmd.arrival)
        return None

    def _start_program(self, cmd: _Start) -> Exception | None:
        self._num_added += 1
        try:
            program = cmd.factory(self.engine)
        except ValueError as e:
            return e
        except Exception as e:          # a bug in a program: this request fails, the engine goes on
            logger.exception("request %s failed to start", cmd.request_id)
            self.engine.abort_request(cmd.request_id)      # (the program frees its sequences itself)
            return RequestFailed(f"the request failed to start: {type(e).__name__}: {e}")
        self._programs[cmd.request_id] = _LiveProgram(program, cmd.stream, cmd.arrival)
        return None

    def _abort(self, request_ids: list[str] | None, error: RequestAborted, deliveries: list[Delivery]) -> None:
        for rid in list(self._programs) if request_ids is None else request_ids:
            live = self._programs.pop(rid, None)
            if live is not None:
                live.program.abort()        # frees every branch now
                deliveries.append((live.stream, error))
        for rid in list(self._tracked) if request_ids is None else request_ids:
            tracked = self._tracked.pop(rid, None)
            self.engine.abort_request(rid)
            if tracked is not None:
                deliveries.append((tracked.stream, error))

    def _step(self) -> None:
        before = self._stats
        start = time.monotonic()
        outputs = self.engine.step()
        now = time.monotonic()
        report = StepReport(now - start, 0, 0, before)
        deliveries = []
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            self._time_tokens(tracked, out, now, report)
            deliveries.append((tracked.stream, out))
            if out.finished:
                del self._tracked[out.request_id]
                reason = "error" if out.error else (out.outputs[0].finish_reason or "stop")
                report.finished.append((reason, now - tracked.arrival))
        if self._programs:
            self._advance_programs(deliveries, report)
        self._stats = report.stats = self._snapshot()
        report.num_sampled = report.stats["generation_tokens"] - before["generation_tokens"]
        report.num_tokens = report.num_sampled + report.stats["prompt_tokens"] - before["prompt_tokens"]
        self._send([], deliveries)
        if self._on_step is not None:
            self._on_step(report)

    def _advance_programs(self, deliveries: list[Delivery], report: StepReport) -> None:
        """Let every program act on this step's results; send progress, and results of those done.
        A failing program ends itself (result.error); one that could never progress is ended by
        the shared loop (programs.advance_programs)."""
        ended = {id(p) for p in advance_programs(self.engine, [live.program for live in self._programs.values()])}
        now = time.monotonic()
        for rid, live in list(self._programs.items()):
            done = id(live.program) in ended
            events = live.program.drain_events()
            if not done:
                progress = self._progress(live, now)
                if progress is not None:
                    events.append(progress)
            else:
                del self._programs[rid]
                if live.program.result.error:
                    logger.error("request %s: %s", rid, live.program.result.error)
                report.finished.append(("error" if live.program.result.error else "stop", now - live.arrival))
            if events or done:
                deliveries.append((live.stream, ProgramUpdate(events, live.program.result if done else None)))

    def _progress(self, live: _LiveProgram, now: float) -> dict | None:
        """A progress snapshot when branches started or finished, else at most every progress_interval."""
        progress = live.program.progress()
        key = (progress["branches_alive"], progress["branches_finished"])
        if key == live.progress_key and (now - live.progress_at < self.progress_interval
                                         or progress["generated_tokens"] == live.progress_tokens):
            return None
        live.progress_key, live.progress_at, live.progress_tokens = key, now, progress["generated_tokens"]
        return progress

    @staticmethod
    def _time_tokens(tracked: _Tracked, out: RequestOutput, now: float, report: StepReport) -> None:
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        if num_tokens <= tracked.num_tokens:
            return
        if tracked.last_token is None:
            report.ttfts.append(now - tracked.arrival)
        else:
            report.inter_token_latencies.append(now - tracked.last_token)
        tracked.last_token, tracked.num_tokens = now, num_tokens

    def _snapshot(self) -> dict:
        return {**self.engine.stats(), "requests_added": self._num_added,
                "requests_in_flight": len(self._tracked) + len(self._programs)}

    def _send(self, settlements: list[Settlement], deliveries: list[Delivery]) -> None:
        if settlements or deliveries:
            self._loop.call_soon_threadsafe(_settle, settlements, deliveries)

    def _die(self, exc: Exception) -> None:
        error = EngineDeadError(f"the engine has failed: {exc!r}")
        with self._lock:
            self.error = exc
            pending = self._take_commands(block=False)
        settlements = [(cmd.future, error) for cmd in pending if isinstance(cmd, (_Add, _Start))]
        deliveries = [(t.stream, error) for t in self._tracked.values()]
        self._tracked.clear()
        for live in self._programs.values():
            deliveries.append((live.stream, error))
            try:
                live.program.abort()        # free its branches if the engine still can
            except Exception:
                logger.exception("could not free the branches of request %s", live.program.request_id)
        self._programs.clear()
        self._send(settlements, deliveries)


def _settle(settlements: list[Settlement], deliveries: list[Delivery]) -> None:
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
