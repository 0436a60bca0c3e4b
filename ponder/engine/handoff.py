"""Prefill/decode disaggregation, the engine side: a request's prompt KV handed from one engine to
another, so the decode engine continues without recomputing it.

A prefill engine runs a request added with `prefill_only=True` like any other until its first token
is sampled, so time to first token is the prefill engine's (as in Splitwise and vLLM's P/D). If
that token ends it (EOS, a stop string, max_tokens 1) it finishes there as usual and never moves.
Otherwise `hold` ends it with finish reason "handoff" and keeps its blocks (`engine.held`) until
`export` turns it into a `Handoff` and frees them, or `drop_held` frees them (the client left).

A `Handoff` is plain data and one numpy array, so it pickles with the array out of band (what
Ray's object store moves at memory speed). The KV is token-major, [layers, 2, prompt tokens,
kv_heads, head_dim]: one gather on export and one scatter on import, each copying contiguous rows
of kv_heads * head_dim values, with no padding past the last token and no tie to the prefill
engine's block size (a per-block array would copy longer rows, but ship a partial block's padding
and need the same block size on both sides).

`admit` on a decode engine of the same model and KV dtype takes the prompt blocks its prefix cache
already holds, writes the rest of the KV into fresh blocks, registers the full ones in its prefix
index, and schedules the request to compute its first token's KV and sample the second. Output is
what one engine gives: the KV bits, the sequences' seeds, detokenizer state and logprobs are the
prefill engine's, and the kernels compute a row the same whatever else is in the batch. A request
with n > 1 forks at its first sample on the prefill engine, as on one engine; the hand-off carries
every completion and the one copy of the prompt KV they share, and the decode engine forks again.

A program's prompt (a think request, whose branches all run on one decode engine) moves another
way, since a program runs on one engine: `PrefillPrompt` describes a program that computes the
prompt on a prefill engine as a think root does — all but its last token, sampling nothing — and
ends with its KV as a `PromptKV`. `warm` on the decode engine writes the full blocks of that KV,
registers them in its prefix index and frees them (cached, as a finished request leaves them),
creating no request; `Warmed` does that and builds the program in one go on the engine thread, so
nothing evicts the blocks in between, and the program's prompt takes them from the prefix cache.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch

from ponder.engine.prompts import check_prompt
from ponder.engine.sequence import Request, Sequence, SequenceStatus
from ponder.outputs import Logprob
from ponder.sampling_params import SamplingParams

HANDOFF = "handoff"   # finish reason of a prefill-only request whose KV waits for export


class HandoffError(ValueError):
    """A hand-off this engine cannot continue (another model, KV dtype or context); nothing changed."""


@dataclass(frozen=True)
class ModelIdentity:
    """What must match for KV computed by one engine to be used by another."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    weights: str              # fp32, native, q8_0 …: each computes different KV
    digest: str               # of the embedding's first rows, the norms and the rotary and norm settings

    @classmethod
    def of(cls, engine) -> "ModelIdentity":
        """The identity of `engine`'s model (computed once per loaded model)."""
        model = engine.loaded.model
        if model not in _identities:
            _identities[model] = cls._compute(engine.loaded)
        return _identities[model]

    @classmethod
    def _compute(cls, loaded) -> "ModelIdentity":
        cfg, model = loaded.config, loaded.model
        h = hashlib.blake2b(repr((cfg.num_heads, cfg.intermediate_size, cfg.rope_theta, cfg.rope_scaling,
                                  cfg.rms_norm_eps, cfg.qkv_bias, cfg.qk_norm)).encode(), digest_size=16)
        norms = [norm.weight for layer in model.layers
                 for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
        for tensor in [model.embed_tokens(torch.arange(8)), model.norm.weight, *norms]:
            h.update(tensor.detach().float().contiguous().numpy().tobytes())
        return cls(cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim,
                   cfg.vocab_size, loaded.weights, h.hexdigest())


# a cache, not state: a loaded model's weights do not change
_identities: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class CompletionState:
    """One completion as the prefill engine left it."""

    index: int
    seed: int
    output_token_ids: list[int]
    text: str
    prefix_offset: int              # detokenizer window over prompt + output ids
    read_offset: int
    logprobs: list[Logprob] | None
    finish_reason: str | None       # None: it continues on the decode engine
    stop_reason: str | int | None = None


@dataclass
class Handoff:
    """A prefilled request in transit: everything a decode engine needs to continue it."""

    request_id: str
    model: ModelIdentity
    kv_cache_dtype: str             # "fp16" or "fp32"
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[CompletionState]
    kv: np.ndarray                  # [layers, 2, len(prompt_token_ids), kv_heads, head_dim]
    prompt_logprobs: list[Logprob | None] | None = None
    num_cached_tokens: int = 0      # prompt tokens the prefill engine took from its prefix cache
    next_index: int = 1

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


@dataclass
class PromptKV:
    """A program's prompt KV in transit, with no request: that of the first `kv.shape[2]` tokens of
    `prompt_token_ids` (`PrefillPrompt` computes all but the last)."""

    model: ModelIdentity
    kv_cache_dtype: str
    prompt_token_ids: list[int]
    kv: np.ndarray                  # [layers, 2, tokens computed, kv_heads, head_dim]

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


# -- the prefill engine -------------------------------------------------------------------------
def hold(engine, seq: Sequence) -> None:
    """A prefill-only sequence has its first token: it finishes with "handoff", keeping its blocks."""
    engine.scheduler.park(seq)
    seq.status, seq.finish_reason = SequenceStatus.FINISHED, HANDOFF
    engine.held[seq.request.request_id] = seq.request


def export(engine, request_id: str) -> Handoff:
    """The hand-off of a held request; its blocks are freed (they stay in the prefix index)."""
    request = engine.held.pop(request_id, None)
    if request is None:
        raise KeyError(f"request {request_id!r} is not waiting for a hand-off (not prefill-only, "
                       f"not prefilled yet, already exported, or aborted)")
    try:
        source = next(s for s in request.seqs if s.finish_reason == HANDOFF)
        assert source.num_computed_tokens == source.num_prompt_tokens, "a held sequence has computed its prompt"
        kv = engine.runner.read_kv(source.block_table, 0, source.num_prompt_tokens)
    finally:
        _free(engine, request)
    return Handoff(request.request_id, ModelIdentity.of(engine), engine.kv_cache_dtype, request.prompt,
                   list(request.prompt_token_ids), request.params, [_state(s) for s in request.seqs], kv,
                   _copy(request.prompt_logprobs), request.num_cached_tokens, request.next_index)


def drop_held(engine, request_id: str) -> bool:
    """Free a held request that will not be exported; False if none is held under that id."""
    request = engine.held.pop(request_id, None)
    if request is not None:
        _free(engine, request)
    return request is not None


def _free(engine, request: Request) -> None:
    for seq in request.seqs:
        engine.kv.free(seq)


def _state(seq: Sequence) -> CompletionState:
    return CompletionState(seq.index, seq.seed, seq.output_token_ids, seq.text, seq.prefix_offset, seq.read_offset,
                           _copy(seq.logprobs), None if seq.finish_reason == HANDOFF else seq.finish_reason,
                           seq.stop_reason)


def _copy(items: list | None) -> list | None:
    return list(items) if items is not None else None


@dataclass
class PromptPrefilled:
    """What a `PrefillPrompt` program ends with: the prompt's KV, or why not ("aborted" if it was)."""

    kv: PromptKV | None
    error: str | None = None


@dataclass(frozen=True)
class PrefillPrompt:
    """A program's description (a factory, engine/programs.py), so another process can start it:
    compute the prompt `prompt_token_ids` as a think root does — all but its last token, sampling
    nothing — and end with their KV (`PromptPrefilled`), freeing the blocks (they stay cached)."""

    prompt_token_ids: list[int]
    request_id: str

    @property
    def options(self) -> dict:
        """What a router charges it (distributed/frontend.py reads a program's options): one token."""
        return {"max_tokens": 1}

    def __call__(self, engine) -> "_PromptPrefill":
        return _PromptPrefill(engine, list(self.prompt_token_ids), self.request_id)


class _PromptPrefill:
    """The program a PrefillPrompt describes: one driven request, closed once its KV is read."""

    def __init__(self, engine, prompt_token_ids: list[int], request_id: str):
        self.engine, self.request_id, self.result = engine, request_id, None
        self.request = engine.add_request(None, SamplingParams(max_tokens=1), request_id,
                                          prompt_token_ids=prompt_token_ids, driven=True)
        self.root = self.request.seqs[0]

    def advance(self) -> bool:
        if self.result is None:
            lost = self.request.error or (None if self.request_id in self.engine.requests else "aborted")
            if lost:
                self._end(None, lost)
            elif self.root.status is SequenceStatus.PARKED:      # all but the last token computed
                kv = self.engine.runner.read_kv(self.root.block_table, 0, self.root.num_computed_tokens)
                self._end(PromptKV(ModelIdentity.of(self.engine), self.engine.kv_cache_dtype,
                                   list(self.request.prompt_token_ids), kv))
        return self.result is not None

    def abort(self) -> None:
        if self.result is None:
            self._end(None, "aborted")

    def _end(self, kv: PromptKV | None, error: str | None = None) -> None:
        self.engine.close_request(self.request)
        self.result = PromptPrefilled(kv, error)

    def drain_events(self) -> list[dict]:
        return []

    def progress(self) -> dict:
        return {"event": "progress", "branches_alive": 1, "branches_finished": 0, "generated_tokens": 0}


# -- the decode engine --------------------------------------------------------------------------
def admit(engine, handoff: Handoff, request_id: str | None = None) -> Request:
    """Continue `handoff` on this engine as request `request_id` (default: the prefill side's id).
    Raises HandoffError (another model, KV dtype or too long a context) or ValueError (id in use)."""
    check_compatible(engine, handoff)
    request_id = handoff.request_id if request_id is None else request_id
    if request_id in engine.requests:
        raise ValueError(f"request id {request_id!r} is already in use")
    request = Request(request_id, handoff.prompt, list(handoff.prompt_token_ids), handoff.params,
                      num_cached_tokens=handoff.num_cached_tokens, next_index=handoff.next_index,
                      first_token_time=time.monotonic(), prompt_logprobs=_copy(handoff.prompt_logprobs),
                      tokens_generated=sum(len(c.output_token_ids) for c in handoff.completions))
    request.seqs = [_sequence(engine, request, c) for c in handoff.completions]
    _place(engine, [s for s in request.seqs if not s.finished], handoff.kv)
    engine.requests[request_id] = request
    return request


def check_compatible(engine, handoff: Handoff) -> None:
    """Raise HandoffError unless this engine can continue `handoff` exactly."""
    _check_kv(engine, handoff, len(handoff.prompt_token_ids))
    if all(c.finish_reason is not None for c in handoff.completions):
        raise HandoffError("every completion of the hand-off has finished: there is nothing to continue")
    longest = len(handoff.prompt_token_ids) + max(len(c.output_token_ids) for c in handoff.completions)
    if longest >= engine.max_model_len:
        raise HandoffError(f"the hand-off is {longest} tokens, but this engine's context is "
                           f"{engine.max_model_len}")


def _check_kv(engine, handoff: "Handoff | PromptKV", num_tokens: int) -> None:
    """Raise HandoffError unless this engine's cache can take `handoff`'s KV of `num_tokens` tokens."""
    mine = ModelIdentity.of(engine)
    if handoff.model != mine:
        differ = [f.name for f in fields(ModelIdentity) if getattr(handoff.model, f.name) != getattr(mine, f.name)]
        raise HandoffError(f"the hand-off comes from another model ({', '.join(differ)} differ: "
                           f"{handoff.model} here {mine}); prefill and decode engines must load the same weights")
    if handoff.kv_cache_dtype != engine.kv_cache_dtype:
        raise HandoffError(f"the hand-off's KV is {handoff.kv_cache_dtype} but this engine's cache is "
                           f"{engine.kv_cache_dtype}; start prefill and decode engines with the same kv_cache_dtype")
    try:
        check_prompt(handoff.prompt_token_ids, engine.vocab_size, engine.max_model_len, engine.pool)
    except ValueError as e:
        raise HandoffError(f"this engine cannot continue the hand-off: {e}") from None
    cfg = engine.model_config
    expected = (cfg.num_layers, 2, num_tokens, cfg.num_kv_heads, cfg.head_dim)
    if handoff.kv.shape != expected:
        raise HandoffError(f"the hand-off's KV is shaped {handoff.kv.shape}, not {expected} (layers, k/v, "
                           f"prompt tokens, kv heads, head dim)")


def _sequence(engine, request: Request, c: CompletionState) -> Sequence:
    ids = request.prompt_token_ids + c.output_token_ids
    constraint = request.params.structured_outputs
    matcher = engine.grammars.matcher(constraint) if constraint is not None and c.finish_reason is None else None
    if matcher is not None:     # the constraint reads the text generated so far, as on the prefill side
        matcher.consume_tokens(list(c.output_token_ids))
    seq = Sequence(request, ids, len(request.prompt_token_ids), index=c.index, seed=c.seed, text=c.text,
                   prefix_offset=c.prefix_offset, read_offset=c.read_offset, logprobs=_copy(c.logprobs),
                   finish_reason=c.finish_reason, stop_reason=c.stop_reason, last_sampled_pos=len(ids) - 1,
                   matcher=matcher)
    if c.finish_reason is not None:
        seq.status = SequenceStatus.FINISHED
    return seq


def _place(engine, live: list[Sequence], kv: np.ndarray) -> None:
    """Give the live sequences the prompt's KV and schedule them: the first takes the blocks the
    prefix cache holds and writes the rest, the others share its blocks (as forks do). With no
    room in the pool now, they queue as preempted sequences do, to recompute the prompt (exactly)."""
    first, num_prompt = live[0], live[0].num_prompt_tokens
    cached = engine.kv.match_prefix(first)
    if not engine.kv.allocate_slots(first, num_prompt - cached):
        engine.kv.free(first)       # the matched blocks stay cached
        for seq in live:
            engine.scheduler.add(seq)
        return
    engine.runner.write_kv(first.block_table, cached, kv[:, :, cached:])
    first.num_computed_tokens = num_prompt
    engine.kv.commit_computed(first)
    for seq in live[1:]:
        engine.kv.fork(first, seq)
    for seq in live:
        engine.scheduler.resume(seq)


def warm(engine, prompt: PromptKV) -> int:
    """Write the full blocks of `prompt`'s KV (those its prefix cache does not hold yet), register
    them in the prefix index and free them: they stay cached, as a finished request leaves its
    blocks, and no request is created. Returns the prompt tokens the prefix cache then holds, those
    a request for this prompt takes from it (fewer when the pool has no room now). Raises
    HandoffError as `admit` does (another model, KV dtype or too long a prompt)."""
    _check_kv(engine, prompt, prompt.kv.shape[2])
    ids = list(prompt.prompt_token_ids)
    if prompt.kv.shape[2] > len(ids):
        raise HandoffError(f"the prompt's KV has {prompt.kv.shape[2]} tokens, more than its {len(ids)}")
    if not engine.pool.enable_prefix_caching:
        return 0                    # nothing would keep the blocks
    bs = engine.pool.block_size
    full = min(prompt.kv.shape[2], len(ids) - 1) // bs * bs      # what match_prefix can take
    seq = Sequence(Request("warm", None, ids, SamplingParams()), ids, len(ids), index=0, seed=0)
    try:
        held = engine.kv.match_prefix(seq)
        if held < full and engine.kv.allocate_slots(seq, full - held):
            engine.runner.write_kv(seq.block_table, held, prompt.kv[:, :, held:full])
            seq.num_computed_tokens = held = full
            engine.kv.commit_computed(seq)
        return held
    finally:
        engine.kv.free(seq)


@dataclass(frozen=True)
class Warmed:
    """A program factory: `warm` the engine with `prompt`, then build `factory`'s program, in one
    call on the engine thread (no step can evict the blocks in between); the program's prompt then
    takes them from the prefix cache."""

    prompt: PromptKV
    factory: Callable           # a program factory (engine/programs.py, which imports the engine)

    def __call__(self, engine):
        engine.warm_prefix(self.prompt)
        return self.factory(engine)
