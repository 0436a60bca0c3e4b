"""The front end of prefill/decode disaggregation: P prefill and D decode replicas (pd_replica.py)
behind the AsyncEngine's interface, so the HTTP server serves them as it serves one engine.

Two ReplicaSets (frontend.py) do the work, each with its own router, health checks and replacement
of replicas that die: the prefill set routes a request by the `--router` policy (prefix-aware by
default: a shared prompt is computed on the replica that caches it); its replica streams the first
token and posts a `HandoffReady` (the KV's object-store reference); the decode set, routing
least-loaded, continues the request there, feeding the same stream. The KV goes from one replica
to the other through the object store; the front end only passes the reference on.

A think request runs every branch on one decode replica (where they share KV), its prompt
prefilled on a prefill replica: the decode set picks the replica (least loaded) and counts the
request on it; meanwhile a prefill replica (by the prefill set's policy) runs the engine's
`PrefillPrompt` program and ends it with the prompt KV's reference (`PromptReady`); the chosen
decode replica fetches it and starts the think program `Warmed` with it: the prompt's full blocks
are written into its prefix cache first, so the program's prompt takes them from there and computes
only the tokens past the last full block. (A description whose prompt is not rendered to ids yet —
chat messages, not a ThinkPrompt — is prefilled where it runs.)

Aborts (a client that leaves) reach a request wherever it is: on its prefill replica (held KV is
freed; a think prompt's program is ended), in transit (the hand-off is dropped when it lands, and
the object store frees the KV with its last reference), or on its decode replica. A prefill or
decode replica that dies fails its requests with EngineDeadError naming it and its role, and is
replaced; a hand-off whose prefill replica died before the decode replica fetched it fails with
RequestFailed, and so does a think request whose prompt's prefill replica died.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray

from ponder.distributed.cluster import check_cpus
from ponder.distributed.frontend import SHUTDOWN_REASON, ReplicaSet, Submission
from ponder.distributed.loop_tasks import LoopTasks
from ponder.distributed.health import HealthPolicy
from ponder.distributed.metrics import sum_stats
from ponder.distributed.pd_replica import ABORTED, DecodeReplica, PrefillReplica
from ponder.distributed.replica import ReplicaSpec
from ponder.distributed.wire import HandoffReady, WireError
from ponder.engine.handoff import PrefillPrompt
from ponder.engine.programs import ProgramFactory
from ponder.engine.streams import EngineDeadError, EngineUnavailable, RequestAborted, RequestFailed, Stream
from ponder.sampling_params import SamplingParams

logger = logging.getLogger("ponder.distributed")

_STREAM_ERRORS = (RequestAborted, RequestFailed, EngineDeadError)     # what a stream may end with


class DisaggregatedReplicas(LoopTasks):
    """P prefill and D decode replicas of one engine. Construct (blocking: the replicas load their
    models), then `start()` on the event loop that will serve it."""

    def __init__(self, spec: ReplicaSpec, num_prefill: int, num_decode: int, policy: str = "prefix-aware",
                 ready_timeout: float = 600.0, health: HealthPolicy | None = None):
        for what, count in (("prefill", num_prefill), ("decode", num_decode)):
            if count < 1:
                raise ValueError(f"the number of {what} replicas must be >= 1, got {count}")
        check_cpus(num_prefill + num_decode, spec.num_cpus, f"{num_prefill} prefill + {num_decode} decode replicas")
        self.prefill = ReplicaSet(spec, num_prefill, policy, PrefillReplica, ready_timeout, health, role="prefill",
                                  on_handoff=self._hand_off)
        try:
            self.decode = ReplicaSet(spec, num_decode, "least-loaded", DecodeReplica, ready_timeout, health,
                                     role="decode")
        except BaseException:
            for replica in self.prefill.replicas.values():
                ray.kill(replica.actor, no_restart=True)
            raise
        self.info = self.prefill.info
        self._in_transit: dict[str, Submission] = {}    # engine request id -> its prefill submission
        self._warming: dict[str, bool] = {}             # think requests being started -> aborted meanwhile
        LoopTasks.__init__(self)                        # hand-offs, think starts, drains
        self._accepting = False

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start both replica sets; call on the event loop."""
        self._loop = asyncio.get_running_loop()
        self.prefill.start()
        self.decode.start()
        self._accepting = True

    async def drain(self, timeout: float) -> None:
        """Take no new request; the prefill replicas finish and hand off what they have (think
        prompts included), then the decode replicas finish theirs, all within `timeout` seconds
        (then the rest is aborted)."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        await self.prefill.drain(timeout)
        while (self._in_transit or self._warming) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self.decode.drain(max(0.0, deadline - time.monotonic()))

    async def shutdown(self) -> None:
        """Abort whatever is in flight and end every replica of both sets."""
        self._accepting = False
        self._cancel_background()
        await asyncio.gather(self.prefill.shutdown(), self.decode.shutdown())

    # -- requests ---------------------------------------------------------------------------------
    async def add(self, prompts: list[list[int]], params: SamplingParams, request_id: str) -> Stream:
        """Queue the requests on a prefill replica; each goes on on a decode replica after its
        first token (AsyncEngine.add's contract)."""
        self._check_accepting()
        return await self.prefill.add(prompts, params, request_id)

    async def start_program(self, factory: ProgramFactory, request_id: str) -> Stream:
        """Run a program (a think request) on one decode replica, its prompt prefilled on a prefill
        replica (see the module's docstring); AsyncEngine.start_program's contract."""
        self._check_accepting()
        ids = list(getattr(factory, "prompt_token_ids", []))
        if not ids:                         # not rendered yet: prefilled where it runs
            return await self.decode.start_program(factory, request_id)
        self._warming[request_id] = False
        starting = self._loop.create_task(self._start_warmed(factory, ids, request_id))
        try:
            return await asyncio.shield(starting)
        except asyncio.CancelledError:      # the start goes on to its end, so it frees what it took
            self.abort([request_id])
            starting.add_done_callback(lambda t: t.cancelled() or t.exception())
            raise

    async def _start_warmed(self, factory: ProgramFactory, ids: list[int], request_id: str) -> Stream:
        prefilled: list = []                # [the KV's refs or why not]: once, though decode replicas may refuse

        async def send(link) -> WireError | None:
            if not prefilled:
                prefilled.append(await self._prefill(ids, request_id))
            if isinstance(prefilled[0], WireError):
                return prefilled[0]
            if self._warming[request_id]:
                return WireError.of(RequestAborted(ABORTED))     # (the object store frees the KV)
            error = await link.call("start_warmed", prefilled[0], factory, request_id)
            if error is None and self._warming[request_id]:    # aborted while the replica took it
                self.decode.abort([request_id])
            return error

        try:
            return await self.decode.start_program(factory, request_id, send)
        finally:
            del self._warming[request_id]

    async def _prefill(self, ids: list[int], request_id: str) -> list | WireError:
        """The object-store reference of the prompt's KV, computed on a prefill replica; or why not."""
        try:
            if self._warming[request_id]:
                raise RequestAborted(ABORTED)
            stream = await self.prefill.start_program(PrefillPrompt(ids, request_id), request_id)
            if self._warming[request_id]:   # aborted while the prefill replica took it
                self.prefill.abort([request_id])
            ready = await stream.final()
        except EngineDeadError as e:        # its prefill replica died
            return WireError.of(RequestFailed(f"the think prompt could not be prefilled: {e}"))
        except Exception as e:              # aborted, refused (overloaded, a bad prompt) or failed
            return WireError.of(e)
        return ready.refs

    def abort(self, request_ids: list[str], reason: str = "aborted by the client") -> None:
        """Abort requests wherever they are (non-blocking); unknown or finished ids are ignored."""
        for rid in request_ids:
            if rid in self._warming:
                self._warming[rid] = True
            parent = self._in_transit.get(rid)
            if parent is not None:
                parent.aborted = True
        self.prefill.abort(request_ids, reason)
        self.decode.abort(request_ids, reason)

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise EngineUnavailable(SHUTDOWN_REASON if self._loop is not None else "the replicas are not started")

    # -- hand-offs --------------------------------------------------------------------------------
    def _hand_off(self, parent: Submission, ready: HandoffReady) -> None:
        """A prefill replica's request waits in the object store: continue it on a decode replica
        (unless it was aborted: dropping the reference frees the KV)."""
        if parent.aborted:
            parent.stream._receive(RequestAborted(ABORTED))
            return
        self._in_transit[ready.request_id] = parent
        self._background(self._continue(parent, ready))

    async def _continue(self, parent: Submission, ready: HandoffReady) -> None:
        rid = ready.request_id
        try:
            if parent.aborted:
                raise RequestAborted(ABORTED)
            await self.decode.continue_handoff(parent, ready)
            if parent.aborted:              # an abort that came while the decode replica took it
                self.decode.abort([rid])
        except _STREAM_ERRORS as e:
            parent.stream._receive(e)
        except Exception as e:              # EngineUnavailable, a HandoffError: the request cannot go on
            logger.error("request %s could not move to a decode replica: %s", rid, e)
            parent.stream._receive(RequestFailed(f"no decode replica could continue the request: {e}"))
        finally:
            del self._in_transit[rid]

    # -- observation --------------------------------------------------------------------------------
    @property
    def sets(self) -> tuple[ReplicaSet, ReplicaSet]:
        return self.prefill, self.decode

    @property
    def healthy(self) -> bool:
        return self.prefill.healthy and self.decode.healthy

    @property
    def error(self) -> str | None:
        return self.prefill.error or self.decode.error

    @property
    def num_in_flight(self) -> int:
        """Engine requests on some replica or in transit (one on both sides counts twice)."""
        return self.prefill.num_in_flight + self.decode.num_in_flight + len(self._in_transit)

    @property
    def stats(self) -> dict:
        return sum_stats([self.prefill.stats, self.decode.stats])

    def health(self) -> dict:
        """{"status": "ok" | "error", "replicas": each replica with its role, index and state}."""
        reports = [s.health() for s in self.sets]
        report = {"status": "ok" if self.healthy else "error", "replicas": [r for h in reports for r in h["replicas"]]}
        if not self.healthy:
            report["error"] = "; ".join(h["error"] for h in reports if "error" in h)
        return report

    async def labelled_metrics(self) -> list[tuple[dict[str, str], bytes]]:
        """Every serving replica's Prometheus text, labelled with its index and role."""
        both = await asyncio.gather(*(s.labelled_metrics() for s in self.sets))
        return [text for texts in both for text in texts]

    def kv_reports(self) -> dict[tuple[str, int], dict]:
        """Blocking (not on the event loop): each serving replica's `kv_report()`, by (role, index)."""
        serving = [(s.role, r) for s in self.sets for r in s.replicas.values() if r.state == "serving"]
        reports = ray.get([r.actor.kv_report.remote() for _, r in serving], timeout=30)
        return {(role, r.index): report for (role, r), report in zip(serving, reports)}
