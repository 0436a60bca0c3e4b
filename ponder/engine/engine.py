"""LLMEngine: add_request / step / abort — the loop everything else drives."""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass

import torch

from ponder.config import EngineConfig
from ponder.engine import handoff, prompt_logprobs
from ponder.engine.detokenizer import append_tokens, init_detokenizer, process_token
from ponder.engine.probes import ProbeExtension
from ponder.engine.prompts import check_prompt, prompt_ids
from ponder.engine.scheduler import SchedulerOutput
from ponder.engine.sequence import Action, Control, Request, Sequence, SequenceStatus
from ponder.engine.setup import build_parts
from ponder.engine.speculation import Speculation
from ponder.engine.structured import GrammarMask, Grammars
from ponder.engine.token_stats import SelfCertaintyExtension
from ponder.layers.sampler import SamplerExtension, SamplerOutput, SamplingBatch, sample
from ponder.model.loader import LoadedModel, weight_stats
from ponder.outputs import RequestOutput
from ponder.sampling_params import SamplingParams, sampling_defaults

@dataclass
class EngineStats:
    prompt_tokens: int = 0            # prompt tokens computed (prefilled)
    prompt_tokens_cached: int = 0     # prompt tokens reused from the prefix cache
    recomputed_tokens: int = 0        # generated tokens recomputed after preemption
    generation_tokens: int = 0
    steps: int = 0
    max_batch_seqs: int = 0           # most sequences in one forward


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None):
        self.config = config = config or EngineConfig()
        parts = build_parts(config, loaded)
        self.loaded, self.max_model_len, self.kv_cache_dtype = parts.loaded, parts.max_model_len, parts.kv_cache_dtype
        self.pool, self.kv, self.runner, self.scheduler = parts.pool, parts.kv, parts.runner, parts.scheduler
        self.model_config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.eos_token_ids = list(self.tokenizer.eos_token_ids or self.model_config.eos_token_ids)
        self.vocab_size = self.model_config.vocab_size
        # what requests built by LLM, the CLI, the server and think get for unset sampling fields
        self.sampling_defaults = sampling_defaults(config.sampling_defaults, self.model_config.recommended_sampling)
        self.requests: dict[str, Request] = {}
        self.held: dict[str, Request] = {}   # prefill-only requests done, their KV kept for export
        self.stats_ = EngineStats()
        self._seed_rng = random.Random(config.seed)
        self._weight_stats = weight_stats(self.loaded)
        self._ids = itertools.count()
        self.grammars = Grammars(self.tokenizer.to_json, self.vocab_size, self.eos_token_ids, torch.get_num_threads())
        self.sampler_extensions: tuple[SamplerExtension, ...] = (ProbeExtension(), GrammarMask(self.grammars),
                                                                 SelfCertaintyExtension())
        self.speculation = Speculation(config.speculative_method, config.num_speculative_tokens,
                                       config.prompt_lookup_min, config.prompt_lookup_max,
                                       config.speculative_disable_by_batch_size, self.max_model_len, parts.draft,
                                       config.speculative_tree_width, self.runner.move_tokens,
                                       config.speculative_adaptive)

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int] | None, params: SamplingParams | None = None,
                    request_id: str | None = None, prompt_token_ids: list[int] | None = None,
                    driven: bool = False, prefill_only: bool = False) -> Request:
        """Queue a request; raises ValueError naming the problem if it cannot be served.

        `driven`: a program (think) drives its sequences: the prompt is prefilled, all but its last
        token, and the sequence parks; see `run_step`, `prefill`, `probe`, `fork`, `release`.
        `prefill_only`: the request ends after its first token with finish reason "handoff", its KV
        held for `export_handoff` (prefill/decode disaggregation, engine/handoff.py)."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = prompt_ids(self.tokenizer, prompt, prompt_token_ids)
        check_prompt(ids, self.vocab_size, self.max_model_len, self.pool)
        if prefill_only and driven:
            raise ValueError("a driven request (think) cannot be prefill-only: its program runs on one engine")
        request = Request(request_id, text, ids, params, prefill_only=prefill_only)
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(32)
        matcher = self.grammars.matcher(params.structured_outputs) if params.structured_outputs else None
        seq = Sequence(request, list(ids), len(ids), index=0, seed=seed,
                       control=Control(Action.PREFILL) if driven else None, matcher=matcher)
        init_detokenizer(seq)
        request.seqs.append(seq)
        self.requests[request_id] = request
        self.scheduler.add(seq)
        return request

    def abort_request(self, request_id: str) -> bool:
        if handoff.drop_held(self, request_id):
            return True
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return True

    def export_handoff(self, request_id: str) -> handoff.Handoff:
        """The KV and state of a prefill-only request that finished with "handoff"; frees its blocks."""
        return handoff.export(self, request_id)

    def add_handoff(self, hand: handoff.Handoff, request_id: str | None = None) -> Request:
        """Continue a request another engine prefilled (`export_handoff`) from its first token."""
        return handoff.admit(self, hand, request_id)

    def warm_prefix(self, prompt: handoff.PromptKV) -> int:
        """Cache a prompt's KV computed elsewhere (handoff.PrefillPrompt) in the prefix index, with
        no request; returns the prompt tokens a request for it will take from the cache."""
        return handoff.warm(self, prompt)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, execute, sample, post-process. Returns outputs of the requests that progressed.
        With speculative decoding, sequences draft tokens before scheduling and verify them in the
        same forward (engine/speculation.py)."""
        self.speculation.propose(self.scheduler.running)
        plan = self.scheduler.schedule()
        self.speculation.trim(plan.chunks)
        touched = self._settle_unscheduled(plan)
        if plan.chunks:
            seqs, logits = self._execute(plan)
            out = sample(logits, SamplingBatch.build(seqs, self.vocab_size, self.eos_token_ids,
                                                     self.sampler_extensions))
            self._post_process(seqs, out)
            touched.update(ch.seq.request for ch in plan.chunks)
        self.speculation.settle(self.scheduler.running)
        outputs = [r.output() for r in touched]
        for r in touched:
            if r.finished:
                self.requests.pop(r.request_id, None)
        return outputs

    def _settle_unscheduled(self, plan: SchedulerOutput) -> set[Request]:
        """Fail prompts that can never fit; end sequences that cannot grow; count prefix hits."""
        touched = {seq.request for seq in plan.failed + plan.out_of_blocks}
        for seq in plan.failed:
            self._fail(seq.request, f"prompt of {seq.num_tokens} tokens does not fit in the KV cache")
        if plan.failed:   # a failed request's other sequences may have been scheduled: drop them
            plan.chunks = [ch for ch in plan.chunks if not ch.seq.finished]
        for seq in plan.out_of_blocks:
            seq.finish_reason = "length"
        self._account_prefix_hits(plan)
        return touched

    def _execute(self, plan: SchedulerOutput) -> tuple[list[Sequence], torch.Tensor]:
        """Run the model over the scheduled chunks and record the prompt logprobs they give;
        returns the sequences to sample, one per row of logits (a request with n > 1 forks its
        prompt's sequence at the first sample)."""
        self.runner.copy_blocks(plan.block_copies)
        chunks, rows = [], []
        for i, ch in enumerate(plan.chunks):
            seq, start = ch.seq, ch.seq.num_computed_tokens
            chunks.append((seq.token_ids[start:start + ch.num_tokens], start, seq.block_table,
                           self.speculation.token_tree(seq)))
            if ch.samples:
                rows.append(i)
        sampling = [plan.chunks[i].seq for i in rows]
        for extension in self.sampler_extensions:   # token masks are filled while the model runs
            extension.before_forward([s for s in sampling if not _forks_now(s)])
        scoring = prompt_logprobs.score_ranges(plan.chunks)   # positions that score a prompt
        verifying = self.speculation.ranges(plan.chunks)      # positions that verify drafts
        logits = self.runner.execute(chunks, rows, scoring + verifying)
        scored_end = len(rows) + sum(end - first for _, first, end in scoring)
        if scoring:
            prompt_logprobs.record(plan.chunks, scoring, logits[len(rows):scored_end])
        verify_logits, logits = logits[scored_end:], logits[:len(rows)]
        self._account(plan)
        seqs, logits = self._fork_new_groups(sampling, logits)
        if verifying:       # each verified position is one more row to sample
            seqs = seqs + self.speculation.rows(plan.chunks, verifying)
            logits = torch.cat([logits, verify_logits])
        return seqs, logits

    def _post_process(self, seqs: list[Sequence], out: SamplerOutput) -> None:
        """Append each row's token (detokenize, check stops), or a drafting sequence's accepted
        tokens, or record a probe; end what is done."""
        probes = out.extras.get(ProbeExtension.name, {})
        certainty = out.extras.get(SelfCertaintyExtension.name, {})
        verified = self.speculation.drawn(seqs, out.token_ids, out.logprobs)
        now = time.monotonic()
        for row, (seq, token, logprob) in enumerate(zip(seqs, out.token_ids, out.logprobs)):
            if not isinstance(seq, Sequence):
                continue                       # a verified position: taken with its sequence below
            if row in probes:
                seq.control.probe_logprobs = probes[row]
                seq.num_computed_tokens -= 1   # nothing sampled: its next run recomputes the last token
                self.scheduler.park(seq)
                continue
            if seq.request.first_token_time is None:
                seq.request.first_token_time = now
            if seq.num_draft:
                self.speculation.accept(seq, verified[id(seq)] + [(token, logprob)], self._append_token, self.kv)
            else:
                self._append_token(seq, token, logprob)
                if row in certainty:
                    seq.self_certainty.append(certainty[row])
            if seq.control is not None and (seq.finish_reason is not None or seq.control.stop_reason is not None):
                self.scheduler.park(seq)   # the program frees it when it is done with it
            elif seq.finish_reason is not None:
                self.scheduler.finish(seq)
            elif seq.request.prefill_only:
                handoff.hold(self, seq)

    def _append_token(self, seq: Sequence, token: int, logprob) -> None:
        if logprob is not None:
            seq.logprobs = (seq.logprobs or []) + [logprob]
        process_token(seq, token, self.tokenizer, self.eos_token_ids, self.max_model_len)
        seq.last_sampled_pos = seq.num_tokens - 1
        seq.request.tokens_generated += 1
        self.stats_.generation_tokens += 1

    def _account_prefix_hits(self, plan: SchedulerOutput) -> None:
        for seq, hit in plan.prefix_hits:
            cached = min(hit, seq.num_prompt_tokens)
            self.stats_.prompt_tokens_cached += cached
            seq.request.num_cached_tokens = max(seq.request.num_cached_tokens, cached)
            seq.request.tokens_reused += hit

    def _account(self, plan: SchedulerOutput) -> None:
        st = self.stats_
        st.steps += 1
        st.max_batch_seqs = max(st.max_batch_seqs, len(plan.chunks))
        for ch in plan.chunks:
            seq = ch.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + ch.num_tokens
            seq.request.tokens_prefilled += ch.num_tokens - (start <= seq.last_sampled_pos < end)
            prompt_part = max(0, min(end, seq.num_prompt_tokens) - start)
            st.prompt_tokens += prompt_part
            real_end = min(end, seq.num_tokens - seq.num_draft - 1)   # drafts are not recomputed tokens
            st.recomputed_tokens += max(0, real_end - max(start, seq.num_prompt_tokens))
            seq.num_computed_tokens = end
            if not seq.num_draft:          # a drafting sequence registers its blocks once verified
                self.kv.commit_computed(seq)

    def _fork_new_groups(self, seqs: list[Sequence], logits: torch.Tensor):
        """A request with n > 1 forks its prompt sequence at the first sample: children share its KV."""
        if not any(_forks_now(s) for s in seqs):
            return seqs, logits
        rows, expanded = [], []
        for i, seq in enumerate(seqs):
            rows.append(i)
            expanded.append(seq)
            if _forks_now(seq):
                for child in self.fork(seq, seq.request.params.n - 1):
                    rows.append(i)
                    expanded.append(child)
        return expanded, logits[torch.tensor(rows)]

    def fork(self, seq: Sequence, n: int) -> list[Sequence]:
        """n children of `seq` sharing all its blocks (copy-on-write), scheduled alongside it.

        Children of a parked sequence are parked too; a finished-but-parked (think) parent passes
        on its finish reason.
        """
        children = []
        request = seq.request
        for _ in range(n):
            index = request.next_index
            request.next_index += 1
            child = Sequence(request, list(seq.token_ids), seq.num_prompt_tokens, index=index,
                             seed=hash((seq.seed, index)) & 0xFFFFFFFF,
                             text=seq.text, prefix_offset=seq.prefix_offset, read_offset=seq.read_offset,
                             logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                             finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                             last_sampled_pos=seq.last_sampled_pos,
                             control=Control(Action.GENERATE) if seq.control is not None else None,
                             matcher=seq.matcher.deep_copy() if seq.matcher is not None else None,
                             self_certainty=list(seq.self_certainty) if seq.self_certainty is not None else None)
            self.kv.fork(seq, child)
            request.tokens_reused += seq.num_computed_tokens
            request.seqs.append(child)
            if seq.status is SequenceStatus.RUNNING:
                self.scheduler.resume(child)
            else:
                child.status = seq.status
            children.append(child)
        return children

    # -- programs drive their sequences between steps through these (ponder.think) -------------
    def run_step(self, seq: Sequence, stop: tuple[str, ...] = (), max_tokens: int | None = None,
                 stop_token_ids: tuple[int, ...] = ()) -> None:
        """Generate on a parked, driven sequence until a delimiter in `stop` (kept in the text),
        `max_tokens` more tokens or one of the request's own stops; then it parks again."""
        self._check_parked(seq, "run a step on")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"a step's max_tokens must be >= 1, got {max_tokens}")
        seq.control = Control(Action.GENERATE, tuple(stop), tuple(stop_token_ids), max_tokens,
                              start=seq.num_output_tokens, text_start=len(seq.text))
        self.scheduler.resume(seq)

    def prefill(self, seq: Sequence) -> None:
        """Compute a driven sequence's pending tokens but the last, sampling nothing; then park."""
        self._set_action(seq, Action.PREFILL)

    def probe(self, seq: Sequence, token_ids: list[int]) -> None:
        """Compute a driven sequence's pending tokens and record the next-token logprobs of
        `token_ids` in `seq.control.probe_logprobs`, sampling nothing; then park."""
        self._set_action(seq, Action.PROBE)
        seq.control.probe_token_ids, seq.control.probe_logprobs = tuple(token_ids), None

    def _set_action(self, seq: Sequence, action: Action) -> None:
        if seq.status is SequenceStatus.WAITING and seq.control is not None:
            seq.control.action = action              # a fresh prompt, still queued: it runs the action
            return
        self._check_parked(seq, "run")
        seq.control.action = action
        self.scheduler.resume(seq)

    def _check_parked(self, seq: Sequence, what: str) -> None:
        if seq.control is None:
            raise ValueError("only a sequence of a driven request takes actions (add_request(driven=True))")
        if seq.status is not SequenceStatus.PARKED:
            raise ValueError(f"only a parked sequence can {what} (this one is {seq.status.value})")

    def append(self, seq: Sequence, token_ids: list[int]) -> None:
        """Extend a parked sequence by forced tokens; they are computed (prefilled) when it next runs."""
        self._check_parked(seq, "be extended")
        if seq.num_tokens + len(token_ids) >= self.max_model_len:
            raise ValueError(f"appending {len(token_ids)} tokens would exceed the context of "
                             f"{self.max_model_len} tokens")
        append_tokens(seq, list(token_ids), self.tokenizer)
        if seq.matcher is not None:       # forced text the constraint must read, like sampled text
            seq.matcher.consume_tokens(list(token_ids))

    def track_self_certainty(self, seq: Sequence) -> None:
        """Record the Self-Certainty of each token `seq` (and its forks) generates from now on."""
        if seq.self_certainty is None:
            seq.self_certainty = []

    def release(self, seq: Sequence, reason: str = "pruned") -> None:
        """Free `seq`'s blocks now and drop it from its request (think prune)."""
        if seq.finish_reason is None:
            seq.finish_reason = reason
        if not seq.finished:
            self.scheduler.finish(seq)
        if seq in seq.request.seqs:
            seq.request.seqs.remove(seq)

    def close_request(self, request: Request) -> None:
        """Free every sequence a driven request still holds and retire it."""
        for seq in list(request.seqs):
            self.release(seq, "closed")
        self.requests.pop(request.request_id, None)

    def _fail(self, request: Request, message: str) -> None:
        request.error = message
        for seq in request.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "error"
            if not seq.finished:
                self.scheduler.finish(seq)

    # -- outputs and stats -----------------------------------------------------------------
    def stats(self) -> dict:
        st = self.stats_
        return {
            **self._weight_stats,
            "kv_cache_dtype": self.kv_cache_dtype,
            "kv_blocks_total": self.pool.num_blocks,
            "kv_blocks_free": self.pool.num_free,
            "kv_blocks_cached": self.pool.num_cached,
            "prompt_tokens": st.prompt_tokens,
            "prompt_tokens_cached": st.prompt_tokens_cached,
            "recomputed_tokens": st.recomputed_tokens,
            "generation_tokens": st.generation_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "steps": st.steps,
            "spec_draft_tokens": self.speculation.stats.drafted,
            "spec_accepted_tokens": self.speculation.stats.accepted,
            "spec_verified_seqs": self.speculation.stats.verified_seqs,
            **(self.speculation.draft.stats() if self.speculation.draft is not None else {}),
            "max_batch_seqs": st.max_batch_seqs,
        }


def _forks_now(seq: Sequence) -> bool:
    """A request with n > 1 forks its one sequence at its first sample."""
    return seq.request.params.n > 1 and len(seq.request.seqs) == 1
