"""The front end over N engine replicas (Ray actors, distributed/replica.py) with the AsyncEngine's
interface — add, start_program, abort, stats, healthy, drain, shutdown, num_in_flight — so the HTTP
server (server/app.py) serves it as it serves one engine.

Each request goes to the replica the Router picks (prefix-aware by default); a replica that refuses
it as overloaded is skipped for the next, and when every one refuses the request gets
EngineUnavailable with a Retry-After (503). Outputs come back on each replica's one update channel
and are fed into the same `Stream`s the server reads from a local engine.

Failures: a replica whose channel breaks (its process died, `ray.kill`), whose engine loop failed,
or that stops answering health checks (health.py) is taken out of rotation at once; its in-flight
requests end with EngineDeadError naming it, the others go on, and a replacement is started (and
joins the rotation when ready). A think request is sent as its description (a dataclass such as
ponder.think.run.ThinkProgram) and built into a program inside the replica.

In P/D mode (distributed/pd_frontend.py) two replica sets work together: the prefill set (`role`
"prefill") passes each `HandoffReady` its replicas post to `on_handoff`, and the decode set takes
the request over with `continue_handoff`, feeding the same stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import ray

from ponder.distributed.channel import ChannelClosed, RayLink, SocketLink
from ponder.distributed.cluster import ClusterError, check_cpus
from ponder.distributed.loop_tasks import LoopTasks
from ponder.distributed.health import HealthPolicy, describe, watch, within
from ponder.distributed.metrics import sum_stats
from ponder.distributed.replica import EngineReplica, Entry, ReplicaInfo, ReplicaSpec
from ponder.distributed.router import Router, cost_tokens
from ponder.distributed.wire import HandoffReady, OutputDecoder, WireError
from ponder.engine.async_engine import SHUTDOWN_REASON
from ponder.engine.programs import ProgramFactory
from ponder.engine.streams import EngineDeadError, EngineUnavailable, ProgramUpdate, RequestAborted, Stream
from ponder.sampling_params import SamplingParams

logger = logging.getLogger("ponder.distributed")

_THINK_MAX_TOKENS = 512          # a program's cost when its description sets no max_tokens


@dataclass
class Submission:
    """One add or program in flight on a replica."""

    key: str                          # the request id the server gave
    engine_ids: list[str]             # its engine requests' ids (a program's: the key)
    cost: int                         # router load: prompt plus most new tokens
    program: bool = False
    replica: int = -1
    stream: Stream | None = None
    decoder: OutputDecoder = field(default_factory=OutputDecoder)
    aborted: bool = False             # the caller aborted it (a hand-off of it is not continued)
    part_of: "Submission | None" = None   # a hand-off continued here: the stream and decoder are its




@dataclass
class Replica:
    index: int
    actor: object                     # ray.actor.ActorHandle
    link: object = None               # how requests reach it: channel.SocketLink or RayLink
    state: str = "starting"           # starting -> serving -> draining | dead | stopped
    info: ReplicaInfo | None = None
    replaces: int | None = None       # the replica this one replaced
    error: str | None = None
    health: dict = field(default_factory=dict)
    missed: int = 0                   # health checks in a row without an answer
    pump: asyncio.Task | None = None
    submissions: dict[str, Submission] = field(default_factory=dict)


class ReplicaSet(LoopTasks):
    """N replicas of one engine behind a router. Construct (blocking: the replicas load their
    models), then `start()` on the event loop that will serve it."""

    def __init__(self, spec: ReplicaSpec, num_replicas: int, policy: str = "prefix-aware",
                 replica_class: type = EngineReplica, ready_timeout: float = 600.0,
                 health: HealthPolicy | None = None, role: str | None = None,
                 on_handoff: Callable[[Submission, HandoffReady], None] | None = None):
        """role: "prefill" or "decode" in P/D mode (in health, metrics labels and errors);
        on_handoff: what to do with a prefill replica's HandoffReady."""
        self.role, self.name = role, f"{role} replica" if role else "replica"
        if num_replicas < 1:
            raise ValueError(f"the number of {self.name}s must be >= 1, got {num_replicas}")
        self.spec, self.ready_timeout = spec, ready_timeout
        self.health_policy = health or HealthPolicy()
        self.on_handoff = on_handoff
        check_cpus(num_replicas, spec.num_cpus, f"{num_replicas} {self.name}s")
        self._actor_class = ray.remote(replica_class)
        # the data plane: a socket to each replica unless told (or the replica class needs) Ray
        use_socket = spec.channel == "socket" and replica_class.SOCKET_CHANNEL
        self._channel_token = secrets.token_bytes(16) if use_socket else None
        self._replicas: dict[int, Replica] = {}
        self._indices = itertools.count()
        self._submissions: dict[str, Submission] = {}     # by engine request id
        LoopTasks.__init__(self)                          # replacements, drains, the health watch
        self._accepting = False
        started = [self._spawn() for _ in range(num_replicas)]
        try:
            infos = ray.get([r.actor.ready.remote(self._channel_token) for r in started], timeout=ready_timeout)
        except Exception as e:
            for r in started:
                ray.kill(r.actor, no_restart=True)
            raise ClusterError(f"the {self.name}s did not start: {describe(e)}") from None
        self.info = infos[0]
        self.router = Router(policy, block_size=self.info.block_size)
        for replica, info in zip(started, infos):
            self._serve(replica, info)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start reading the replicas' outputs and checking their health; call on the event loop."""
        if self._loop is not None:
            raise RuntimeError("the replica set is already started")
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        for replica in self._replicas.values():
            replica.pump = self._loop.create_task(self._pump(replica))
        self._background(watch(lambda: [r for r in self._replicas.values() if r.state in ("serving", "draining")],
                               self.health_policy, self._lost))

    async def drain(self, timeout: float) -> None:
        """Take no new request; let every replica finish what it has for up to `timeout` seconds,
        then abort the rest (their streams raise RequestAborted)."""
        self._accepting = False
        draining = [r for r in self._replicas.values() if r.state == "serving"]
        for replica in draining:
            replica.state = "draining"
        await asyncio.gather(*(within(r.actor.drain.remote(timeout), timeout + self.health_policy.timeout)
                               for r in draining), return_exceptions=True)
        deadline = time.monotonic() + self.health_policy.timeout     # the replicas' last entries
        while self._submissions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def shutdown(self) -> None:
        """Abort whatever is in flight, stop every replica and end its actor."""
        self._accepting = False
        self._cancel_background()
        live = [r for r in self._replicas.values() if r.state not in ("dead", "stopped")]
        await asyncio.gather(*(within(r.actor.shutdown.remote(), self.health_policy.timeout) for r in live),
                             return_exceptions=True)
        for replica in list(self._replicas.values()):
            self._stop(replica, "stopped", RequestAborted(SHUTDOWN_REASON))

    def set_policy(self, policy: str) -> None:
        """Route by `policy` from now on: a fresh router over the replicas in rotation (what the
        old one remembered is forgotten); for comparing policies, with nothing in flight."""
        router = Router(policy, block_size=self.info.block_size)
        for index in self.router.load:
            router.add_replica(index)
        self.router = router

    # -- requests ---------------------------------------------------------------------------------
    async def add(self, prompts: list[list[int]], params: SamplingParams, request_id: str) -> Stream:
        """Queue one engine request per prompt on one replica (AsyncEngine.add's contract)."""
        if self.role == "prefill":      # its replicas compute the prompt and one token
            cost = sum(len(p) + params.n for p in prompts)
        else:
            cost = sum(cost_tokens(len(p), params.n, params.max_tokens, self.info.max_model_len) for p in prompts)
        sub = Submission(request_id, [f"{request_id}-{i}" for i in range(len(prompts))], cost)
        await self._submit(sub, prompts[0] if prompts else [],
                           lambda link: link.call("add", prompts, params, request_id))
        return sub.stream

    async def start_program(self, factory: ProgramFactory, request_id: str, send=None) -> Stream:
        """Start a program on one replica from its description (a dataclass the replica calls with
        its engine, such as ponder.think.run.ThinkProgram); `send(link)`: how, if not its start_program."""
        if not dataclasses.is_dataclass(factory) or isinstance(factory, type):
            raise TypeError("replicas start a program from its description (a dataclass instance such as "
                            f"ponder.think.run.ThinkProgram), not from {type(factory).__name__}")
        ids = list(getattr(factory, "prompt_token_ids", []))
        options = getattr(factory, "options", {})
        cost = len(ids) + int(options.get("n") or 1) * int(options.get("max_tokens") or _THINK_MAX_TOKENS)
        sub = Submission(request_id, [request_id], cost, program=True)
        await self._submit(sub, ids, send or (lambda link: link.call("start_program", factory, request_id)))
        return sub.stream

    async def continue_handoff(self, parent: Submission, ready: HandoffReady) -> None:
        """Continue the handed-off engine request `ready.request_id` of `parent` (a submission of
        the prefill set) on one of these replicas; its outputs go on feeding `parent.stream`."""
        part = Submission(ready.request_id, [ready.request_id], ready.cost_tokens, part_of=parent)
        await self._submit(part, [], lambda link: link.call("add_handoff", ready.refs, ready.request_id))

    def abort(self, request_ids: list[str], reason: str = "aborted by the client") -> None:
        """Abort requests (non-blocking); unknown or finished ids are ignored."""
        by_replica = defaultdict(list)
        for rid in request_ids:
            sub = self._submissions.get(rid)
            if sub is not None:
                sub.aborted = True
                by_replica[sub.replica].append(rid)
        for index, ids in by_replica.items():
            replica = self._replicas.get(index)
            if replica is not None and replica.state in ("serving", "draining"):
                replica.link.notify("abort", ids, reason)

    async def _submit(self, sub: Submission, prompt_ids: list[int], send) -> None:
        """Place `sub` on the router's replica, or the next one if that one refuses it."""
        if not self._accepting:
            raise EngineUnavailable(SHUTDOWN_REASON if self._loop is not None else "the replicas are not started")
        refused: set[int] = set()
        while True:
            try:
                index = self.router.route(prompt_ids, sub.cost, exclude=frozenset(refused))
            except RuntimeError:
                why = "every replica is full" if refused else "no replica is serving (they are being replaced)"
                raise EngineUnavailable(f"the server is overloaded: {why}; retry later", retry_after=1) from None
            replica = self._replicas[index]
            self._register(sub, replica)
            try:
                error = await send(replica.link)
            except asyncio.CancelledError:
                self.abort(sub.engine_ids)       # it may have been taken: its end comes on the channel
                raise
            except (ray.exceptions.RayError, ChannelClosed) as e:  # the replica is gone: its channel says so too
                error = WireError("EngineDeadError", describe(e))
            if error is None:
                return
            self._forget(sub)
            exc = error.exception()
            if not isinstance(exc, (EngineUnavailable, EngineDeadError)):
                raise exc                        # a bad request: every replica would refuse it
            refused.add(index)

    def _register(self, sub: Submission, replica: Replica) -> None:
        sub.replica = replica.index
        if sub.part_of is None:
            sub.stream, sub.decoder = Stream(sub.engine_ids, sub.program), OutputDecoder()
        else:
            sub.stream, sub.decoder = sub.part_of.stream, sub.part_of.decoder
        replica.submissions[sub.key] = sub
        self._submissions.update((rid, sub) for rid in sub.engine_ids)

    def _forget(self, sub: Submission) -> None:
        replica = self._replicas.get(sub.replica)
        if replica is not None and replica.submissions.pop(sub.key, None) is not None:
            self.router.done(sub.replica, sub.cost)
        for rid in sub.engine_ids:
            self._submissions.pop(rid, None)

    # -- the replicas' channels ------------------------------------------------------------------
    async def _pump(self, replica: Replica) -> None:
        """Feed a replica's update channel into its requests' streams until it breaks."""
        try:
            async for entries in replica.link.batches():
                self._deliver(replica, entries)
                del entries          # nothing here pins a batch (and a hand-off's KV in it) past delivery
            reason = "its update channel ended"
        except (ray.exceptions.RayError, ChannelClosed) as e:
            reason = describe(e)
        except Exception as e:       # a fault in delivery: fail the replica's requests rather than hang them
            logger.exception("delivering replica %s's updates failed", replica.index)
            reason = f"its updates could not be delivered ({e!r})"
        self._lost(replica, reason)

    def _deliver(self, replica: Replica, entries: list[Entry]) -> None:
        for key, payload, ended in entries:
            sub = replica.submissions.get(key)
            if sub is None:
                continue
            if isinstance(payload, WireError):
                sub.stream._receive(payload.exception())
            elif isinstance(payload, ProgramUpdate):
                sub.stream._receive(payload)
            elif isinstance(payload, HandoffReady):
                self.on_handoff(sub, payload)
            else:
                for delta in payload:
                    sub.stream._receive(sub.decoder.decode(delta))
            if ended:
                self._forget(sub)

    # -- health and replacement --------------------------------------------------------------------
    def _lost(self, replica: Replica, reason: str) -> None:
        """Out of rotation now; its requests fail; a replacement starts (unless shutting down)."""
        if replica.state in ("dead", "stopped"):
            return
        logger.error("%s %d is lost: %s", self.name, replica.index, reason)
        self._stop(replica, "dead", EngineDeadError(f"{self.name} {replica.index} failed ({reason}); "
                                                    "the request was lost"))
        replica.error = reason
        if self._accepting:
            self._background(self._replace(replica))

    def _stop(self, replica: Replica, state: str, error: Exception) -> None:
        replica.state = state
        self.router.remove_replica(replica.index)
        for sub in list(replica.submissions.values()):
            sub.stream._receive(error)
            self._forget(sub)
        if replica.pump is not None and replica.pump is not asyncio.current_task():
            replica.pump.cancel()
        if replica.link is not None:
            replica.link.close()
        ray.kill(replica.actor, no_restart=True)

    async def _replace(self, old: Replica) -> None:
        for attempt in itertools.count():
            replica = self._spawn(replaces=old.index)
            try:
                info = await within(replica.actor.ready.remote(self._channel_token), self.ready_timeout)
            except (asyncio.TimeoutError, ray.exceptions.RayError) as e:
                logger.error("%s %d (replacing %d) did not start: %s", self.name, replica.index, old.index,
                             describe(e))
                ray.kill(replica.actor, no_restart=True)
                del self._replicas[replica.index]
                await asyncio.sleep(min(2.0 ** attempt, 30.0))
                continue
            del self._replicas[old.index]
            if not self._accepting:
                ray.kill(replica.actor, no_restart=True)
                del self._replicas[replica.index]
                return
            self._serve(replica, info)
            replica.pump = self._loop.create_task(self._pump(replica))
            logger.info("%s %d replaced %d", self.name, replica.index, old.index)
            return

    def _spawn(self, replaces: int | None = None) -> Replica:
        index = next(self._indices)
        actor = self._actor_class.options(num_cpus=self.spec.num_cpus).remote(self.spec, index)
        self._replicas[index] = replica = Replica(index, actor, replaces=replaces)
        return replica

    def _serve(self, replica: Replica, info: ReplicaInfo) -> None:
        replica.info, replica.state = info, "serving"
        replica.link = (SocketLink(info.channel_address, self._channel_token) if info.channel_address
                        else RayLink(replica.actor))
        self.router.add_replica(replica.index)

    # -- observation --------------------------------------------------------------------------------
    @property
    def replicas(self) -> dict[int, Replica]:
        return dict(self._replicas)

    @property
    def healthy(self) -> bool:
        return any(r.state == "serving" for r in self._replicas.values())

    @property
    def error(self) -> str | None:
        return None if self.healthy else f"no {self.name} is serving"

    @property
    def num_in_flight(self) -> int:
        """Engine requests submitted and not yet finished (a program counts one)."""
        return len(self._submissions)

    @property
    def stats(self) -> dict:
        """The serving replicas' engine stats as of their last health check, summed."""
        return sum_stats([r.health.get("stats", {}) for r in self._replicas.values() if r.state == "serving"])

    def health(self) -> dict:
        """{"status": "ok" | "error", "replicas": [each replica's index, state, error, requests]}."""
        role = {"role": self.role} if self.role else {}
        replicas = [{"replica": r.index, **role, "status": r.state, "error": r.error, "replaces": r.replaces,
                     "requests_in_flight": len(r.submissions)} for r in sorted(self._replicas.values(),
                                                                                key=lambda r: r.index)]
        report = {"status": "ok" if self.healthy else "error", "replicas": replicas}
        if not self.healthy:
            report["error"] = f"no {self.name} is serving: " + "; ".join(
                f"{self.name} {r['replica']} is {r['status']}" for r in replicas)
        return report

    async def labelled_metrics(self) -> list[tuple[dict[str, str], bytes]]:
        """Each serving replica's Prometheus text with the labels that say which it is (replica
        index, and role in P/D mode), of those that answer in time."""
        serving = [r for r in self._replicas.values() if r.state in ("serving", "draining")]
        texts = await asyncio.gather(*(within(r.actor.metrics_text.remote(), self.health_policy.timeout)
                                       for r in serving), return_exceptions=True)
        role = {"role": self.role} if self.role else {}
        return [({"replica": str(r.index), **role}, t) for r, t in zip(serving, texts) if isinstance(t, bytes)]

    def collect_stats(self) -> dict[int, dict]:
        """Blocking (not on the event loop): each serving replica's engine stats now."""
        serving = [r for r in self._replicas.values() if r.state == "serving"]
        reports = ray.get([r.actor.health.remote() for r in serving], timeout=self.health_policy.timeout)
        return {r.index: report["stats"] for r, report in zip(serving, reports)}


