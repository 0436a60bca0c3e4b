"""AsyncEngine: one background thread drives LLMEngine.step(); each request gets its own stream.

The LLMEngine is not thread-safe, so only the engine thread touches it. The event loop sends it
commands (add, start a program, abort, stop; engine/commands.py) through a thread-safe queue,
applied between steps. Results go back to the loop in one `call_soon_threadsafe` per step,
whatever the number of requests, into each caller's stream (engine/streams.py). With no work the
thread blocks on the queue; it is the engine's own thread (engine/engine_thread.py) when given.

Programs (`start_program`, ponder/engine/programs.py — a think strategy is one) run on the same
thread: after every engine step each live program advances (forks, scores, prunes, ...), and its
progress events and, at the end, its result go to its `Stream`. The thread never blocks
while a program is live, even when the scheduler is idle between two of its phases. The async
engine knows no strategy: it is handed a factory that builds the program on the engine thread.

Prefill/decode disaggregation (engine/handoff.py) goes through the same path: `add(...,
prefill_only=True)` on a prefill engine, `call(lambda engine: engine.export_handoff(id))` to take
its KV on the engine thread, and `add_handoff` on a decode engine, streamed like any request.

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
from typing import Any, Callable

from ponder.engine.commands import (Abort, Add, Call, Delivery, LiveProgram, Settlement, Start, StepReport, Stop,
                                    Tracked, settle)
from ponder.engine.engine import LLMEngine
from ponder.engine.engine_thread import EngineThread, LoopOnEngineThread
from ponder.engine.handoff import Handoff
from ponder.engine.programs import ProgramFactory, advance_programs
from ponder.engine.streams import (EngineDeadError, EngineUnavailable, ProgramUpdate, RequestAborted, RequestFailed,
                                   Stream)
from ponder.sampling_params import SamplingParams

logger = logging.getLogger("ponder.engine")

SHUTDOWN_REASON = "the server is shutting down"


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
        self._thread: threading.Thread | LoopOnEngineThread | None = None
        self._drain_task: asyncio.Task | None = None
        self._accepting = False
        self._num_submitted = 0                 # prompts handed to the thread (event-loop side)
        self.error: BaseException | None = None
        # engine-thread state
        self._tracked: dict[str, Tracked] = {}
        self._programs: dict[str, LiveProgram] = {}   # live programs by request id
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
            self._thread = LoopOnEngineThread(self._engine_thread, self._run)
        self._thread.start()

    async def drain(self, timeout: float) -> None:
        """Stop admitting requests, let those in flight finish for up to `timeout` seconds, then
        abort the rest (their streams raise RequestAborted)."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.num_in_flight:
            self._commands.put(Abort(None, SHUTDOWN_REASON))

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
            self._commands.put(Stop(SHUTDOWN_REASON))
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # -- requests (event loop) ------------------------------------------------------------------
    async def add(self, prompts: list[list[int]], params: SamplingParams, request_id: str,
                  prefill_only: bool = False) -> Stream:
        """Queue one engine request per prompt (ids `{request_id}-{i}`) sharing `params`;
        `prefill_only`: each ends at its first token, its KV held for export (engine/handoff.py).

        Raises ValueError (a prompt the engine refuses; none of them is queued then),
        EngineUnavailable (overloaded or shutting down) or EngineDeadError.
        """
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        return await self._queue(lambda stream, future: Add(ids, prompts, params, stream, time.monotonic(), future,
                                                            prefill_only=prefill_only), ids)

    async def add_handoff(self, handoff: Handoff, request_id: str) -> Stream:
        """Continue a request another engine prefilled, as engine request `request_id`. Raises as
        `add` does (HandoffError, a ValueError, when this engine cannot continue it)."""
        return await self._queue(lambda stream, future: Add([request_id], [], handoff.params, stream,
                                                            time.monotonic(), future, handoff=handoff), [request_id])

    async def _queue(self, command: Callable[[Stream, asyncio.Future], Add | Start], ids: list[str],
                     program: bool = False) -> Stream:
        """Queue the command `command(stream, future)` for `ids` once admitted; their stream once taken."""
        stream = Stream(ids, program)
        with self._lock:
            self._admit(len(ids))
            future = self._loop.create_future()
            self._num_submitted += len(ids)
            self._commands.put(command(stream, future))
        try:
            await future
        except asyncio.CancelledError:
            self.abort(ids)
            raise
        return stream

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """`fn(engine)`'s result (or exception), run on the engine thread between two steps."""
        with self._lock:
            if self.error is not None or self._thread is None:
                raise EngineDeadError(f"the engine is not running: {self.error!r}")
            future = self._loop.create_future()
            self._commands.put(Call(fn, future))
        return await future

    async def start_program(self, factory: ProgramFactory, request_id: str) -> Stream:
        """Start the program `factory(engine)` builds (on the engine thread; for a think request,
        ponder.think.run.think_program). Counts as one request for admission and in flight.

        Raises ValueError (the factory refused its description or prompt; nothing runs then),
        RequestFailed (the factory failed otherwise), EngineUnavailable or EngineDeadError.
        """
        return await self._queue(lambda stream, future: Start(request_id, factory, stream, time.monotonic(), future),
                                 [request_id], program=True)

    def abort(self, request_ids: list[str], reason: str = "aborted by the client") -> None:
        """Abort requests (non-blocking); unknown or finished ids are ignored."""
        self._commands.put(Abort(list(request_ids), reason))

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

    def health(self) -> dict:
        """What GET /health reports: {"status": "ok"}, or "error" with why."""
        if self.healthy:
            return {"status": "ok"}
        return {"status": "error", "error": f"the engine is not running: {self.error!r}"}

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
            if isinstance(cmd, Add):
                settlements.append((cmd.future, self._add(cmd), None))
            elif isinstance(cmd, Start):
                settlements.append((cmd.future, self._start_program(cmd), None))
            elif isinstance(cmd, Call):
                settlements.append(self._call(cmd))
            elif isinstance(cmd, Abort):
                self._abort(cmd.request_ids, RequestAborted(cmd.reason), deliveries)
            else:
                self._abort(None, RequestAborted(cmd.reason), deliveries)
                keep_running = False
        self._stats = self._snapshot()      # before callers learn their add went through
        self._send(settlements, deliveries)
        return keep_running

    def _add(self, cmd: Add) -> ValueError | None:
        added = []
        self._num_added += len(cmd.request_ids)
        try:
            if cmd.handoff is not None:
                self.engine.add_handoff(cmd.handoff, cmd.request_ids[0])
                added.append(cmd.request_ids[0])
            for rid, prompt in zip(cmd.request_ids, cmd.prompts):
                self.engine.add_request(prompt, cmd.params, request_id=rid, prefill_only=cmd.prefill_only)
                added.append(rid)
        except ValueError as e:
            for rid in added:
                self.engine.abort_request(rid)
            return e
        moved = 0 if cmd.handoff is None else sum(len(c.output_token_ids) for c in cmd.handoff.completions)
        for rid in added:
            self._tracked[rid] = Tracked(cmd.stream, cmd.arrival, cmd.arrival if moved else None, moved)
        return None

    def _call(self, cmd: Call) -> Settlement:
        try:
            return cmd.future, None, cmd.fn(self.engine)
        except Exception as e:          # the caller's to handle; the engine goes on
            return cmd.future, e, None

    def _start_program(self, cmd: Start) -> Exception | None:
        self._num_added += 1
        try:
            program = cmd.factory(self.engine)
        except ValueError as e:
            return e
        except Exception as e:          # a bug in a program: this request fails, the engine goes on
            logger.exception("request %s failed to start", cmd.request_id)
            self.engine.abort_request(cmd.request_id)      # (the program frees its sequences itself)
            return RequestFailed(f"the request failed to start: {type(e).__name__}: {e}")
        self._programs[cmd.request_id] = LiveProgram(program, cmd.stream, cmd.arrival)
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
            tracked.time_tokens(out, now, report)
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

    def _progress(self, live: LiveProgram, now: float) -> dict | None:
        """A progress snapshot when branches started or finished, else at most every progress_interval."""
        progress = live.program.progress()
        key = (progress["branches_alive"], progress["branches_finished"])
        if key == live.progress_key and (now - live.progress_at < self.progress_interval
                                         or progress["generated_tokens"] == live.progress_tokens):
            return None
        live.progress_key, live.progress_at, live.progress_tokens = key, now, progress["generated_tokens"]
        return progress

    def _snapshot(self) -> dict:
        return {**self.engine.stats(), "requests_added": self._num_added,
                "requests_in_flight": len(self._tracked) + len(self._programs)}

    def _send(self, settlements: list[Settlement], deliveries: list[Delivery]) -> None:
        if settlements or deliveries:
            self._loop.call_soon_threadsafe(settle, settlements, deliveries)

    def _die(self, exc: Exception) -> None:
        error = EngineDeadError(f"the engine has failed: {exc!r}")
        with self._lock:
            self.error = exc
            pending = self._take_commands(block=False)
        settlements = [(cmd.future, error, None) for cmd in pending if isinstance(cmd, (Add, Start, Call))]
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
