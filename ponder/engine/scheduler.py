"""Continuous batching under a token budget.

There is no prefill phase and decode phase: each step, every running sequence asks for the tokens
it has not computed yet (one for a decode, a chunk for a prompt), running sequences first in
arrival order, then waiting ones, until `max_num_batched_tokens` or `max_num_seqs` is reached.
When blocks run out, the most recently admitted running sequence is preempted: its blocks are
freed and it goes back to the front of the queue, to be recomputed (exactly) later.
A sequence a program asked to prefill (think) computes its pending tokens but the last, then parks:
its KV can be forked before anything is sampled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ponder.engine.kv_cache import KVCacheManager
from ponder.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last logits are sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    num_preempted: int = 0
    failed: list[Sequence] = field(default_factory=list)        # prompt can never fit in the pool
    out_of_blocks: list[Sequence] = field(default_factory=list) # running alone, cannot grow further
    prefix_hits: list[tuple[Sequence, int]] = field(default_factory=list)  # tokens reused on admission

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def resume(self, seq: Sequence) -> None:
        """A parked sequence (KV resident) asks to run again."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.tokens_wanted == 0:             # prefill-only and done: keep the KV, stop here
                self.park(seq)
                continue
            n = min(seq.tokens_wanted, budget)
            while not self.kv.allocate_slots(seq, n):
                victim = self.running.pop()
                if victim is seq and not self.running:
                    # Alone and still out of blocks: it can never grow; end it here.
                    self.kv.free(seq)
                    seq.status = SequenceStatus.FINISHED
                    out.out_of_blocks.append(seq)
                    break
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                out.chunks.append(ScheduledChunk(seq, n))
                budget -= n
                i += 1
        # Admit waiting sequences only if nothing had to be preempted this step. One whose next
        # block another sequence is computing right now waits for it (a step or a few) and then
        # reuses it, instead of computing the same prompt again (SGLang's in-batch prefix caching):
        # n requests for one prompt, sent together, compute it once.
        in_flight = {h for s in self.running if (h := self.kv.next_block_hash(s)) is not None}
        j = 0
        while (j < len(self.waiting) and budget > 0 and not out.num_preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[j]
            # waiting sequences hold no blocks; one scoring its prompt computes all of it
            hit = self.kv.match_prefix(seq) if seq.may_reuse_prefix else 0
            if seq.tokens_wanted == 0:             # prefill-only and all cached
                out.prefix_hits.append((seq, hit))
                del self.waiting[j]
                seq.status = SequenceStatus.PARKED
                continue
            if seq.may_reuse_prefix and self.kv.next_block_hash(seq) in in_flight:
                self.kv.free(seq)                    # leave its hits cached; look again next step
                j += 1
                continue
            n = min(seq.tokens_wanted, budget)
            if not self.kv.allocate_slots(seq, n):
                self.kv.free(seq)                    # the matched blocks stay cached for later
                if self.running:
                    break
                # Alone in the pool it still does not fit: nothing running will free blocks for it.
                del self.waiting[j]
                seq.status = SequenceStatus.FINISHED
                out.failed.append(seq)
                continue
            if hit:
                out.prefix_hits.append((seq, hit))
            del self.waiting[j]
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n
            if (h := self.kv.next_block_hash(seq)) is not None:
                in_flight.add(h)
        out.block_copies = self.kv.take_copies()
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED

    def park(self, seq: Sequence) -> None:
        """Stop scheduling `seq` but keep its KV resident."""
        self.running.remove(seq)
        seq.status = SequenceStatus.PARKED

