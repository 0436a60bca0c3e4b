"""Sequences and requests: the state the scheduler and the engine move around.

A request holds one or more sequences (n > 1 forks the prompt's sequence once it is prefilled).
Sequence states: WAITING (queued, or preempted to be recomputed) -> RUNNING -> FINISHED, with
PARKED for sequences that keep their KV resident but are not scheduled (inference-time compute).
A sequence driven by a program (think: `seq.control` set) runs one action at a time and parks
after each, instead of finishing: the program decides when its KV is freed.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from ponder.outputs import CompletionOutput, Logprob, RequestOutput, Usage
from ponder.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PARKED = "parked"
    FINISHED = "finished"


_seq_ids = itertools.count()


class Action(enum.Enum):
    """What a program-driven sequence does when it next runs."""

    GENERATE = "generate"   # sample until the step's limits or the request's own stops
    PREFILL = "prefill"     # compute pending tokens but the last (its logits are the next sample's)
    PROBE = "probe"         # compute pending tokens, record next-token logprobs, sample nothing


@dataclass
class Control:
    """A program's hold on a sequence (think). Only the engine's methods change it (`run_step`,
    `prefill`, `probe`); the sequence parks with its KV resident when the action is done.

    In a GENERATE step the request's own stops (EOS, stop strings, max_tokens) still finish the
    sequence; the step's limits only end the step.
    """

    action: Action = Action.PREFILL
    stop: tuple[str, ...] = ()              # step delimiters, e.g. ("\n\n",); kept in the text
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int | None = None           # tokens in this step
    start: int = 0                          # num_output_tokens when the step began
    text_start: int = 0                     # len(text) when the step began
    stop_reason: str | int | None = None    # set when the step ended: the delimiter, token id or "length"
    probe_token_ids: tuple[int, ...] = ()   # PROBE: the ids whose logprobs are recorded
    probe_logprobs: list[float] | None = None


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
    logprobs: list[Logprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    control: Control | None = None           # set while a program (think) drives this sequence
    matcher: object | None = None            # structured output: an llguidance matcher at this point of the text
    self_certainty: list[float] | None = None  # per generated token, when asked for (engine/token_stats.py)
    num_draft: int = 0                       # trailing tokens that are drafts being verified this step
    draft_parents: list[int] | None = None   # their parents if they form a token tree (spec/tree.py); None: a chain
    spec_k: int = 0                          # draft length to try next (adapted to acceptance; 0: unset)
    last_sampled_pos: int = -1               # position of the latest sampled token (usage accounting)

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
    def tokens_wanted(self) -> int:
        """Tokens to compute before the next action ends; a prefill leaves its last one for sampling."""
        holds_last = self.control is not None and self.control.action is Action.PREFILL
        return self.num_uncomputed - holds_last

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def may_reuse_prefix(self) -> bool:
        """False while the request's prompt logprobs are incomplete: positions taken from the
        prefix cache are not computed, so they would have no logits to score the prompt with."""
        scored = self.request.prompt_logprobs
        return scored is None or len(scored) >= self.num_prompt_tokens


class PrefixRow:
    """A sequence as the sampler sees it holding only `token_ids` (a prefix of its tokens, or a
    prefix and a token tree's path): what a position that verifies drafts is sampled as — the same
    seed, step index and penalty history as the sequence cut there."""

    matcher = None
    control = None
    self_certainty = None

    def __init__(self, seq: Sequence, token_ids: list[int]):
        self.seq, self.token_ids, self.length = seq, token_ids, len(token_ids)
        self.params, self.seed, self.num_prompt_tokens = seq.params, seq.seed, seq.num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        return self.length - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int = 0               # prompt tokens reused from the prefix cache
    # work for the request, all its sequences together (think usage)
    tokens_prefilled: int = 0                # tokens computed that were not just sampled (prompt, appended)
    tokens_reused: int = 0                   # tokens whose KV was reused: prefix-cache hits, fork sharing
    tokens_generated: int = 0                # tokens sampled
    next_index: int = 1                      # completion index of the next fork (never reused)
    spec_drafted: int = 0                    # speculative decoding: draft tokens verified, and accepted
    spec_accepted: int = 0
    first_token_time: float | None = None
    error: str | None = None
    prefill_only: bool = False               # ends after its first token, KV held for a hand-off
    # with params.prompt_logprobs: one entry per prompt token scored so far (None for the first,
    # which nothing predicts); see ponder/engine/prompt_logprobs.py
    prompt_logprobs: list[Logprob | None] | None = None

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        """What callers see of the request now: text, tokens and usage of every completion."""
        outs = [CompletionOutput(s.index, s.text, s.output_token_ids, s.finish_reason, s.stop_reason,
                                 list(s.logprobs) if s.logprobs is not None else None)
                for s in self.seqs]
        usage = Usage(len(self.prompt_token_ids), sum(len(o.token_ids) for o in outs), self.num_cached_tokens,
                      self.spec_drafted, self.spec_accepted)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.finished,
                             self.error, usage,
                             list(self.prompt_logprobs) if self.prompt_logprobs is not None else None)
