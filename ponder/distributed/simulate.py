"""A discrete-event simulator of a ponder cluster: a request trace over N simulated replicas.

Colocated: `replicas` engines, each prefilling and decoding, behind the real `Router`
(ponder/distributed/router.py; the one routing implementation, with its load charged at `route`
and released when the request finishes). P/D split: `prefill_replicas` engines compute prompts
(routed by the same policy) and sample each request's first token; its KV then travels to a decode
replica (chosen least-loaded) in `kv_bytes_per_token × prompt tokens / handoff_gbs + handoff_latency_s`
seconds, one hand-off at a time per prefill replica's link, and the first token reaches the client
with the KV (so the hand-off is part of TTFT). The prefill replica keeps the blocks until the
hand-off is done. Every step of every replica costs what the per-step cost model predicts
(simulated_replica.py says what a replica models and what it leaves out).

The simulation has no randomness of its own: a trace (a seed) gives one result.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ponder.distributed.request_traces import TraceRequest
from ponder.distributed.router import Router
from ponder.distributed.simulated_replica import Job, ReplicaSpec, SimulatedReplica, StepCost

# SmolLM2-135M's KV per token in fp16: K and V x 30 layers x 3 KV heads x 64 dims x 2 bytes.
SMOLLM2_KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 2


@dataclass(frozen=True)
class ClusterSpec:
    replicas: int = 1                       # colocated replicas (when prefill_replicas is 0)
    prefill_replicas: int = 0               # P/D split: both of these > 0
    decode_replicas: int = 0
    policy: str = "prefix-aware"            # routing of prompts (to colocated or prefill replicas)
    replica: ReplicaSpec = ReplicaSpec()    # colocated and decode replicas
    prefill_replica: ReplicaSpec | None = None   # prefill replicas (default: `replica`)
    kv_bytes_per_token: int = SMOLLM2_KV_BYTES_PER_TOKEN
    handoff_gbs: float = 3.5                # KV hand-off through Ray's object store, measured 3-4 GB/s
    handoff_latency_s: float = 0.002        # fixed cost per hand-off (actor calls, ~1 ms each)
    prefix_blocks: int = 8                  # the router's options
    balance_tokens: int = 2048
    balance_ratio: float = 2.0

    def __post_init__(self):
        if self.disaggregated:
            if self.decode_replicas < 1:
                raise ValueError("a P/D split needs prefill_replicas >= 1 and decode_replicas >= 1")
        elif self.replicas < 1 or self.decode_replicas:
            raise ValueError("a colocated cluster needs replicas >= 1 (and no decode_replicas without "
                             "prefill_replicas)")
        if self.handoff_gbs <= 0 or self.handoff_latency_s < 0:
            raise ValueError("handoff_gbs must be > 0 and handoff_latency_s >= 0")

    @property
    def disaggregated(self) -> bool:
        return self.prefill_replicas > 0

    def handoff_s(self, prompt_len: int) -> float:
        return self.kv_bytes_per_token * prompt_len / (self.handoff_gbs * 1e9) + self.handoff_latency_s

    def describe(self) -> str:
        if self.disaggregated:
            return f"{self.prefill_replicas}P+{self.decode_replicas}D"
        return f"{self.replicas} colocated"


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float


@dataclass
class RequestResult:
    request_id: int
    replica: int                    # colocated or prefill replica
    decode_replica: int | None
    arrival_s: float
    first_token_s: float = float("nan")
    finish_s: float = float("nan")
    prompt_len: int = 0
    output_len: int = 0
    prompt_computed: int = 0        # prompt tokens computed (the rest came from the prefix cache)
    handoff_s: float = 0.0

    @property
    def ttft(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot(self) -> float:
        return (self.finish_s - self.first_token_s) / (self.output_len - 1) if self.output_len > 1 else 0.0

    @property
    def e2e(self) -> float:
        return self.finish_s - self.arrival_s


@dataclass
class SimResult:
    cluster: ClusterSpec
    requests: list[RequestResult]
    replica_busy_s: list[float]
    replica_steps: list[int]
    max_step_tokens: list[int] = field(default_factory=list)

    def metrics(self, slo: SLO) -> dict:
        """TTFT, TPOT and end-to-end latency distributions (seconds), throughput and goodput (requests
        per second meeting both SLOs, over the time from the first arrival to the last finish)."""
        ttft, tpot, e2e = (np.array([getattr(r, k) for r in self.requests]) for k in ("ttft", "tpot", "e2e"))
        span = max(r.finish_s for r in self.requests) - min(r.arrival_s for r in self.requests)
        good = (ttft <= slo.ttft_s) & (tpot <= slo.tpot_s)
        return {"cluster": self.cluster.describe(), "policy": self.cluster.policy,
                "requests": len(self.requests), "duration_s": span,
                "ttft_s": _summary(ttft), "tpot_s": _summary(tpot), "e2e_s": _summary(e2e),
                "throughput_rps": len(self.requests) / span,
                "output_tokens_per_s": sum(r.output_len for r in self.requests) / span,
                "goodput_rps": float(good.sum()) / span, "slo_attainment": float(good.mean()),
                "slo": asdict(slo),
                "prompt_tokens": sum(r.prompt_len for r in self.requests),
                "prompt_tokens_computed": sum(r.prompt_computed for r in self.requests),
                "handoff_s": _summary(np.array([r.handoff_s for r in self.requests])),
                "replica_utilization": [b / span for b in self.replica_busy_s]}


def _summary(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99))}


class _Cluster:
    """The event loop: arrivals, step ends and hand-offs, in time order (ties: in the order made)."""

    def __init__(self, spec: ClusterSpec, cost: StepCost):
        self.spec = spec
        router_options = dict(block_size=spec.replica.block_size, prefix_blocks=spec.prefix_blocks,
                              balance_tokens=spec.balance_tokens, balance_ratio=spec.balance_ratio)
        if spec.disaggregated:
            prefill_spec = spec.prefill_replica or spec.replica
            self.front = [SimulatedReplica(prefill_spec, cost, prefill_only=True) for _ in range(spec.prefill_replicas)]
            self.back = [SimulatedReplica(spec.replica, cost) for _ in range(spec.decode_replicas)]
            self.decode_router = Router("least-loaded", **router_options)
            for i in range(len(self.back)):
                self.decode_router.add_replica(i)
        else:
            self.front = [SimulatedReplica(spec.replica, cost) for _ in range(spec.replicas)]
            self.back = []
        self.router = Router(spec.policy, **router_options)
        for i in range(len(self.front)):
            self.router.add_replica(i)
        self.events: list = []
        self._order = itertools.count()
        self.results: dict[int, RequestResult] = {}
        self.link_free_s = [0.0] * len(self.front)     # each prefill replica sends one hand-off at a time
        self.now = 0.0

    def _at(self, t: float, action, *args) -> None:
        heapq.heappush(self.events, (t, next(self._order), action, args))

    def run(self, trace: list[TraceRequest]) -> SimResult:
        for request in trace:
            self._at(request.arrival_s, self._arrive, request)
        while self.events:
            self.now, _, action, args = heapq.heappop(self.events)
            action(*args)
        stuck = [r.request_id for r in self.results.values() if math.isnan(r.finish_s)]
        if stuck:
            raise RuntimeError(f"{len(stuck)} requests never finished (the first: {stuck[0]})")
        everyone = self.front + self.back
        return SimResult(self.spec, [self.results[r.request_id] for r in trace],
                         [r.busy_s for r in everyone], [r.steps for r in everyone],
                         [r.max_step_tokens for r in everyone])

    def _cost_tokens(self, request: TraceRequest) -> int:
        """The load a request charges its router until it is done (the Ray front end's measure)."""
        return request.prompt_len + request.output_len

    def _arrive(self, request: TraceRequest) -> None:
        i = self.router.route(list(request.prompt_ids), self._cost_tokens(request))
        self.results[request.request_id] = RequestResult(request.request_id, i, None, request.arrival_s,
                                                         prompt_len=request.prompt_len,
                                                         output_len=request.output_len)
        self._submit(self.front, i, request)

    def _submit(self, replicas: list[SimulatedReplica], i: int, request: TraceRequest, **state) -> None:
        replicas[i].submit(request, **state)
        self._step(replicas, i)

    def _step(self, replicas: list[SimulatedReplica], i: int) -> None:
        """Start replica i's next step unless it is in one or has nothing it can run."""
        replica = replicas[i]
        if replica.stepping or not replica.has_work:
            return
        seconds = replica.start_step()
        replica.stepping = seconds is not None
        if replica.stepping:
            self._at(self.now + seconds, self._step_done, replicas, i)

    def _step_done(self, replicas: list[SimulatedReplica], i: int) -> None:
        replicas[i].stepping = False
        first, done = replicas[i].finish_step()
        for job in first:
            result = self.results[job.request.request_id]
            result.prompt_computed += job.prompt_computed
            if self.spec.disaggregated and replicas is self.front:
                self._hand_off(i, job)
            else:
                result.first_token_s = self.now
        for job in (j for j in done if not j.prefill_only):
            result = self.results[job.request.request_id]
            if replicas is self.back:
                self._finish(result, self.decode_router, result.decode_replica)
            else:
                self._finish(result, self.router, result.replica)
        self._step(replicas, i)

    def _hand_off(self, i: int, job: Job) -> None:
        request = job.request
        seconds = self.spec.handoff_s(request.prompt_len)
        start = max(self.now, self.link_free_s[i])
        self.link_free_s[i] = start + seconds - self.spec.handoff_latency_s
        d = self.decode_router.route(list(request.prompt_ids), self._cost_tokens(request))
        result = self.results[request.request_id]
        result.decode_replica, result.handoff_s = d, start + seconds - self.now
        self._at(start + seconds, self._handed_off, i, d, job)

    def _handed_off(self, i: int, d: int, job: Job) -> None:
        self.front[i].release(job)
        self._step(self.front, i)                       # blocks came back: waiting prompts may fit now
        self.router.done(i, self._cost_tokens(job.request))
        result = self.results[job.request.request_id]
        result.first_token_s = self.now
        if job.request.output_len == 1:             # nothing left to decode
            self._finish(result, self.decode_router, d)
        else:
            self._submit(self.back, d, job.request, computed=job.request.prompt_len, produced=1)

    def _finish(self, result: RequestResult, router: Router, replica: int) -> None:
        if not math.isnan(result.finish_s):
            raise AssertionError(f"request {result.request_id} finished twice")
        result.finish_s = self.now
        router.done(replica, result.prompt_len + result.output_len)


def simulate(trace: list[TraceRequest], cluster: ClusterSpec, cost: StepCost) -> SimResult:
    """Replay `trace` over `cluster`, every step priced by `cost`; every request runs to its end."""
    if not trace:
        raise ValueError("the trace is empty")
    return _Cluster(cluster, cost).run(sorted(trace, key=lambda r: (r.arrival_s, r.request_id)))
