"""One simulated engine replica: continuous batching under a token budget, chunked prefill, and a
KV pool whose freed prompt blocks stay cached for reuse (LRU), priced by a per-step cost model.

It follows ponder's scheduler (engine/scheduler.py): each step, running requests first, in arrival
order, take the tokens they still want (a prompt chunk, or one token to decode) until the budget
is spent; then waiting requests are admitted in order while budget, `max_seqs` and blocks allow.
A waiting request whose next uncached block another running request is computing right now waits
for it (the engine's in-batch prefix caching). What the simulator leaves out, on purpose:

- admission reserves a request's whole KV (prompt + output blocks) up front, so nothing is ever
  preempted (the engine preempts by recompute instead, rarely at these loads);
- only prompt blocks are cached for reuse; generated blocks are freed at the end;
- a step's time is the cost model's price of what it computes; sampling, detokenization and
  streaming are inside that price (they were inside the measured steps).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

from ponder.distributed.request_traces import TraceRequest
from ponder.distributed.router import prefix_hashes


class StepCost(Protocol):
    """Seconds one step takes (ponder.bench.costmodel.StepCostModel is one)."""

    def predict(self, prompt_tokens: float = 0, decode_rows: float = 0, context_tokens: float = 0,
                prefill_context_tokens: float = 0) -> float: ...


@dataclass(frozen=True)
class ReplicaSpec:
    max_batched_tokens: int = 512       # the engine's max_num_batched_tokens
    max_seqs: int = 64                  # max_num_seqs
    num_blocks: int = 8192              # KV pool, in blocks
    block_size: int = 16
    prefix_caching: bool = True


@dataclass(eq=False)
class Job:
    """A request's state on one replica."""
    request: TraceRequest
    hashes: list[int]                   # chained hashes of the prompt blocks a later prompt could reuse
    computed: int = 0                   # tokens whose KV is on this replica
    produced: int = 0                   # output tokens sampled so far
    reserved: int = 0                   # blocks held privately (not yet registered in the cache)
    registered: int = 0                 # prompt blocks registered in (and referenced from) the cache
    prompt_computed: int = 0            # prompt tokens this replica computed (not reused)
    prefill_only: bool = False          # a prefill replica's job: done once the first token is sampled

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len

    @property
    def wanted(self) -> int:
        """Tokens to compute next step: the rest of the prompt, or one decode row."""
        return self.prompt_len - self.computed if self.computed < self.prompt_len else 1

    @property
    def finished(self) -> bool:
        return self.produced >= (1 if self.prefill_only else self.request.output_len)

    def next_hash(self) -> int | None:
        return self.hashes[self.registered] if self.registered < len(self.hashes) else None


class PrefixCache:
    """A replica's KV pool in blocks: blocks jobs hold privately, registered prompt blocks (shared,
    ref-counted by the jobs using them) and idle registered blocks kept for reuse, evicted least
    recently used first when room is needed."""

    def __init__(self, capacity: int, block_size: int):
        self.capacity, self.block_size = capacity, block_size
        self.refs: dict[int, int] = {}                  # registered block in use -> jobs using it
        self.idle: OrderedDict[int, None] = OrderedDict()   # registered, unused: reusable, evictable
        self.private = 0

    @property
    def free(self) -> int:
        return self.capacity - len(self.refs) - len(self.idle) - self.private

    def match(self, hashes: list[int]) -> int:
        """Leading blocks of `hashes` that are cached (in use or idle)."""
        n = 0
        while n < len(hashes) and (hashes[n] in self.refs or hashes[n] in self.idle):
            n += 1
        return n

    def admit(self, job: Job, hit: int, blocks_needed: int) -> bool:
        """Reference the `hit` cached blocks and reserve the rest, evicting idle blocks as needed;
        False (and nothing changed) when they do not fit."""
        reuse = job.hashes[:hit]
        idle_hits = sum(h in self.idle for h in reuse)
        fresh = blocks_needed - hit
        if fresh > self.free + len(self.idle) - idle_hits:
            return False
        for h in reuse:
            self._reference(h)
        while self.free < fresh:
            self.idle.popitem(last=False)
        self.private += fresh
        job.reserved, job.registered = fresh, hit
        return True

    def commit(self, job: Job) -> None:
        """Register the job's newly computed full prompt blocks (one computed meanwhile by another
        job is shared, and the private copy given back)."""
        while job.registered < len(job.hashes) and (job.registered + 1) * self.block_size <= job.computed:
            self._reference(job.hashes[job.registered])
            job.registered += 1
            job.reserved -= 1
            self.private -= 1

    def release(self, job: Job) -> None:
        """The job is done here: its private blocks are freed, its registered ones kept for reuse,
        tail first (as the engine releases them), so a prefix's head is evicted last."""
        for h in reversed(job.hashes[:job.registered]):
            self.refs[h] -= 1
            if not self.refs[h]:
                del self.refs[h]
                self.idle[h] = None
        self.private -= job.reserved
        job.reserved = job.registered = 0

    def _reference(self, h: int) -> None:
        if h in self.idle:
            del self.idle[h]
        self.refs[h] = self.refs.get(h, 0) + 1


def attention_reads(start: int, num_tokens: int) -> int:
    """Keys read by `num_tokens` queries at positions start.. (the same count as the cost model's
    feature, ponder.bench.costmodel.attention_reads)."""
    return num_tokens * start + num_tokens * (num_tokens + 1) // 2


class SimulatedReplica:
    """One engine: `submit` jobs, `start_step` prices the next step, `finish_step` applies it."""

    def __init__(self, spec: ReplicaSpec, cost: StepCost, prefill_only: bool = False):
        self.spec, self.cost, self.prefill_only = spec, cost, prefill_only
        self.cache = PrefixCache(spec.num_blocks, spec.block_size)
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.plan: list[tuple[Job, int]] = []       # the step in flight: (job, tokens)
        self.stepping = False
        self.busy_s = 0.0
        self.steps = 0
        self.max_step_tokens = 0

    def submit(self, request: TraceRequest, computed: int = 0, produced: int = 0) -> Job:
        """Queue a request; one whose KV arrived from a prefill replica comes with `computed` and
        `produced` set (its prompt is not matched against the cache nor registered in it)."""
        blocks = self._blocks(request)
        if blocks > self.spec.num_blocks:
            raise ValueError(f"request {request.request_id} needs {blocks} KV blocks; a replica has "
                             f"{self.spec.num_blocks}")
        matchable = (request.prompt_len - 1) // self.spec.block_size
        hashes = (prefix_hashes(list(request.prompt_ids), self.spec.block_size, matchable)
                  if self.spec.prefix_caching and not computed else [])
        job = Job(request, hashes, computed=computed, produced=produced, prefill_only=self.prefill_only)
        self.waiting.append(job)
        return job

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def start_step(self) -> float | None:
        """Schedule the next step; returns its seconds, or None when nothing can run now (a prefill
        replica whose blocks all wait on hand-offs: it steps again once one is released)."""
        budget = self.spec.max_batched_tokens
        plan: list[tuple[Job, int]] = []
        for job in self.running:
            if budget == 0:
                break
            plan.append((job, min(job.wanted, budget)))
            budget -= plan[-1][1]
        in_flight = {h for job in self.running if (h := job.next_hash()) is not None}
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.spec.max_seqs:
            job = self.waiting[i]
            hit = self.cache.match(job.hashes)
            if hit < len(job.hashes) and job.hashes[hit] in in_flight:
                i += 1                               # its next block is being computed: reuse it later
                continue
            if not self.cache.admit(job, hit, self._blocks(job.request)):
                break                                # first come, first served: wait for blocks
            del self.waiting[i]
            job.computed = max(job.computed, hit * self.spec.block_size)
            self.running.append(job)
            plan.append((job, min(job.wanted, budget)))
            budget -= plan[-1][1]
            if (h := job.next_hash()) is not None:
                in_flight.add(h)
        if not plan:
            return None
        self.plan = plan
        return self._price(plan)

    def _price(self, plan: list[tuple[Job, int]]) -> float:
        prompt = decode = context = prefill_context = 0
        for job, n in plan:
            reads = attention_reads(job.computed, n)
            context += reads
            if job.computed >= job.prompt_len:
                decode += 1
            else:
                prompt += n
                prefill_context += reads
        seconds = self.cost.predict(prompt, decode, context, prefill_context)
        self.busy_s += seconds
        self.steps += 1
        self.max_step_tokens = max(self.max_step_tokens, prompt + decode)
        return seconds

    def finish_step(self) -> tuple[list[Job], list[Job]]:
        """Apply the step in flight: returns (jobs that sampled their first token, jobs finished).
        Finished jobs leave the batch; a prefill-only job keeps its blocks until `release`."""
        first, done = [], []
        for job, n in self.plan:
            was_prefill = job.computed < job.prompt_len
            job.computed += n
            if was_prefill:
                job.prompt_computed += n
                self.cache.commit(job)
            if job.computed >= job.prompt_len:
                job.produced += 1
                if job.produced == 1:
                    first.append(job)
            if job.finished:
                done.append(job)
        self.plan = []
        for job in done:
            self.running.remove(job)
            if not job.prefill_only:
                self.cache.release(job)
        return first, done

    def release(self, job: Job) -> None:
        self.cache.release(job)

    def _blocks(self, request: TraceRequest) -> int:
        tokens = request.prompt_len + (0 if self.prefill_only else request.output_len)
        return -(-tokens // self.spec.block_size)
