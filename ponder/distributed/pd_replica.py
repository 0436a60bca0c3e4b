"""The replicas of prefill/decode disaggregation (P/D), as EngineReplica subclasses (replica.py).

A prefill replica runs every request it is given prefill-only (engine/handoff.py): its prompt is
computed and its first token sampled and streamed there. A request whose first token ends it
(EOS, a stop string, max_tokens 1) finishes there as usual. Otherwise the replica, on its engine
thread, exports the request's `Handoff` (which frees its blocks), puts it in Ray's object store
(its KV one numpy array, which the store moves at memory speed) and posts a `HandoffReady` holding
the reference, in a list so that Ray passes it on unresolved. The front end (pd_frontend.py) sends
that to a decode replica, which fetches the hand-off, has its engine take it over (`add_handoff`,
on the engine thread: no recompute) and streams the rest, as any replica streams its requests.

A think request's prompt moves the same way, but as a program's: a prefill replica runs the
engine's `PrefillPrompt` program (the prompt's KV, all but its last token, and no request left),
puts the `PromptKV` it ends with in the object store and ends it with a `PromptReady` holding the
reference; a decode replica fetches it and starts the think program `Warmed` with it (the prompt's
full blocks cached first, in the same engine-thread call), so the program's prompt hits them.

Fault injection, a test hook: `ReplicaSpec.handoff_delays` (or the actor call `set_handoff_delays`)
maps a stage to the seconds the replica pauses there, so a test can make a client disconnect land in the middle of a hand-off:

- "held" (prefill): the first token is posted; the engine holds the KV, not yet exported;
- "exported" (prefill): the KV (or a think prompt's) is in the object store, the prefill blocks
  freed, the front end not told;
- "arrived" (decode): the hand-off (or a think prompt's KV) is fetched; the engine has not taken it.

`kv_report()` says, from the engine thread, whether every block is free and nothing is held.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import ray

from ponder.distributed.disaggregation import as_continuing, handed_off
from ponder.distributed.health import describe
from ponder.distributed.replica import EngineReplica, ReplicaSpec
from ponder.distributed.router import cost_tokens
from ponder.distributed.wire import HandoffReady, PromptReady, WireError
from ponder.engine.handoff import HandoffError, PromptPrefilled, Warmed
from ponder.engine.programs import ProgramFactory
from ponder.engine.streams import RequestAborted, RequestFailed, Stream
from ponder.sampling_params import SamplingParams

STAGES = ("held", "exported", "arrived")
ABORTED = "the request was aborted during its hand-off"


class HandoffReplica(EngineReplica):
    """What both sides share: the fault hook, hand-off counts and timings, and the KV report."""

    SOCKET_CHANNEL = False          # hand-offs carry object references: only Ray's channel may move them

    def __init__(self, spec: ReplicaSpec, replica_id: int):
        super().__init__(spec, replica_id)
        self._delays: dict[str, float] = {}
        self.set_handoff_delays(spec.handoff_delays)
        self.handoffs = {"handoffs": 0, "handoffs_dropped": 0, "handoff_bytes": 0}
        self.recent: deque[dict] = deque(maxlen=256)     # each hand-off's timings, newest last

    def set_handoff_delays(self, delays: dict[str, float]) -> None:
        """The fault hook's pauses from now on: seconds by stage (STAGES); {} for none."""
        unknown = sorted(set(delays) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown hand-off stages {unknown}; they are {', '.join(STAGES)}")
        self._delays = dict(delays)

    async def _pause(self, stage: str) -> None:
        if stage in self._delays:
            await asyncio.sleep(self._delays[stage])

    async def kv_report(self) -> dict:
        """Read on the engine thread: free and total blocks, requests held for export and in the
        engine; with the hand-off counts and the timings of the recent hand-offs."""
        def blocks(engine) -> dict:
            return {"free_blocks": engine.pool.num_free, "num_blocks": engine.pool.num_blocks,
                    "held": len(engine.held), "requests": len(engine.requests)}

        return {**await self.engine.call(blocks), **self.handoffs, "recent": list(self.recent)}

    def _count(self, timings: dict) -> None:
        """One more hand-off (of a request or of a think prompt) done, with its timings."""
        self.handoffs["handoffs"] += 1
        self.handoffs["handoff_bytes"] += timings["kv_bytes"]
        self.recent.append(timings)


class PrefillReplica(HandoffReplica):
    """Computes prompts and first tokens; hands every request that goes on to a decode replica."""

    async def add(self, prompts: list[list[int]], params: SamplingParams, request_id: str) -> WireError | None:
        return await self._take(request_id, self.engine.add(prompts, params, request_id, prefill_only=True))

    async def _post_outputs(self, key: str, outputs: list, ended: bool) -> None:
        """The first tokens as the caller sees them (not finished), then a HandoffReady for each
        request whose KV waits; the last of them ends the submission here."""
        moving = [o.request_id for o in outputs if handed_off(o)]
        shown = [as_continuing(o) if handed_off(o) else o for o in outputs]
        await super()._post_outputs(key, shown, ended and not moving)
        for i, request_id in enumerate(moving):
            try:
                ready = await self._export(request_id)
            except BaseException:
                self.engine.abort(moving[i + 1:])          # frees the ones still held
                raise
            self._outbox.post(key, ready, ended and i == len(moving) - 1)

    async def _export(self, request_id: str) -> HandoffReady:
        await self._pause("held")
        start = time.perf_counter()
        try:
            handoff = await self.engine.call(lambda engine: engine.export_handoff(request_id))
        except KeyError:                                   # aborted while held: the abort freed it
            self.handoffs["handoffs_dropped"] += 1
            raise RequestAborted(ABORTED) from None
        exported = time.perf_counter()
        ref = ray.put(handoff)
        self._count({"request_id": request_id, "kv_bytes": handoff.nbytes, "export_s": exported - start,
                     "put_s": time.perf_counter() - exported})
        await self._pause("exported")
        params, prompt_tokens = handoff.params, len(handoff.prompt_token_ids)
        return HandoffReady(request_id, [ref], handoff.nbytes,
                            cost_tokens(prompt_tokens, params.n, params.max_tokens, self.engine.engine.max_model_len))

    async def _post_result(self, key: str, result) -> None:
        """A think prompt's KV (what a PrefillPrompt program ends with) goes to the object store; the
        program ends with a PromptReady holding its reference."""
        if isinstance(result, PromptPrefilled) and result.kv is not None:
            start = time.perf_counter()
            ref = ray.put(result.kv)
            self._count({"request_id": key, "kv_bytes": result.kv.nbytes, "put_s": time.perf_counter() - start})
            await self._pause("exported")
            result = PromptReady([ref], result.kv.nbytes)
        await super()._post_result(key, result)


class DecodeReplica(HandoffReplica):
    """Continues requests from their hand-offs, and runs think programs on their prompts' KV."""

    def __init__(self, spec: ReplicaSpec, replica_id: int):
        super().__init__(spec, replica_id)
        self._landing: dict[str, bool] = {}     # hand-offs being fetched -> aborted meanwhile

    async def add_handoff(self, refs: list, request_id: str) -> WireError | None:
        """Fetch the hand-off `refs[0]` and continue it as engine request `request_id`; None once
        the engine took it, else why not."""
        return await self._land(refs, request_id, lambda handoff: self.engine.add_handoff(handoff, request_id))

    async def start_warmed(self, refs: list, factory: ProgramFactory, request_id: str) -> WireError | None:
        """Fetch a think prompt's KV `refs[0]` (an engine PromptKV) and start the program `factory`
        describes on it (engine/handoff.py's Warmed: the prompt's full blocks are cached first, so
        they are not recomputed); None once started, else why not."""
        async def start(prompt) -> Stream:
            try:
                return await self.engine.start_program(Warmed(prompt, factory), request_id)
            except HandoffError as e:           # a setup error, not the client's
                raise RequestFailed(f"the think prompt's KV cannot be used here: {e}") from None

        return await self._land(refs, request_id, start)

    async def _land(self, refs: list, request_id: str, submit) -> WireError | None:
        """Fetch `refs[0]`, then (unless aborted meanwhile) follow the stream `submit(it)` gives."""
        self._landing[request_id] = False
        try:
            start = time.perf_counter()
            try:
                landed = await refs[0]
            except ray.exceptions.RayError as e:
                return WireError("RequestFailed", "the request's KV could not be fetched from the object store "
                                                  f"(its prefill replica may have died): {describe(e)}")
            fetched = time.perf_counter()
            await self._pause("arrived")
            if self._landing[request_id]:
                self.handoffs["handoffs_dropped"] += 1
                return WireError.of(RequestAborted(ABORTED))
            taking = time.perf_counter()
            error = await self._take(request_id, submit(landed))
        finally:
            del self._landing[request_id]
        if error is None:
            self._count({"request_id": request_id, "kv_bytes": landed.nbytes, "fetch_s": fetched - start,
                         "import_s": time.perf_counter() - taking})
        return error

    async def abort(self, request_ids: list[str], reason: str = "aborted by the client") -> None:
        for rid in request_ids:
            if rid in self._landing:
                self._landing[rid] = True
        await super().abort(request_ids, reason)
