"""Sequences and requests: the state the scheduler and the engine move around.

A request holds one or more sequences (n > 1 forks the prompt's sequence once it is prefilled).
Sequence states: WAITING (queued, or preempted to be recomputed) -> RUNNING -> FINISHED, with
PARKED for sequences that keep their KV resident but are not scheduled (inference-time compute).
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from ponder.outputs import Logprob
from ponder.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PARKED = "parked"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request: "Request"
    token_ids: list[int]
    num_prompt_tokens: int
    index: int                               # completion index within its request
    seed: int                                # sampling noise key: same seed -> same tokens
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0             # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # hashes of full, computed blocks
    # detokenizer state
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    stop_check_from: int = 0
    logprobs: list[Logprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    stop_token_ids: list[int] | None = None  # overrides the request's stop tokens (think.step)
    max_tokens: int | None = None            # overrides params.max_tokens (think.step)
    step_start: int = 0                      # output length when the current think.step began

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int = 0               # prompt tokens reused from the prefix cache
    first_token_time: float | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
