"""Prompt logprobs (SamplingParams.prompt_logprobs): the logprob of every prompt token after the
first, with its rank and top alternatives — what lm-eval's loglikelihood tasks score.

The logprob of prompt token j comes from the logits at position j - 1, so a chunk computing
positions [start, end) scores prompt tokens start + 1 .. min(end, P - 1); the logits of the last
prompt position are the first sample's, as for any request. A long prompt is scored chunk by chunk
across steps (chunked prefill). The runner runs the LM head on these rows only in steps where a
chunk asks (`score_ranges`), so other steps do no extra work.

Entries are recorded once, in order: `request.prompt_logprobs` holds those of tokens 0 .. k - 1, so
a recompute after preemption, or another sequence of the request computing positions already
scored, adds nothing. A request whose prompt is not fully scored takes nothing from the prefix
cache: the positions it reused would have no logits (`Sequence.may_reuse_prefix`).
"""

from __future__ import annotations

import torch

from ponder.engine.scheduler import ScheduledChunk
from ponder.outputs import Logprob


def score_ranges(chunks: list[ScheduledChunk]) -> list[tuple[int, int, int]]:
    """(chunk index, first, end): the offsets within each chunk whose logits score prompt tokens
    not scored yet. Called before the step's chunks are accounted (num_computed_tokens is the
    position of each chunk's first token)."""
    ranges = []
    for i, ch in enumerate(chunks):
        scored = ch.seq.request.prompt_logprobs
        if scored is None:
            continue
        start = ch.seq.num_computed_tokens
        first = max(start, len(scored) - 1)
        end = min(start + ch.num_tokens, ch.seq.num_prompt_tokens - 1)
        if first < end:
            ranges.append((i, first - start, end - start))
    return ranges


def record(chunks: list[ScheduledChunk], ranges: list[tuple[int, int, int]], logits: torch.Tensor) -> None:
    """Append to each request the prompt logprobs its rows of `logits` (one per position of
    `ranges`, in order) give; the log-softmax is taken in float32."""
    positions = [(chunks[i].seq, chunks[i].seq.num_computed_tokens + p)
                 for i, first, end in ranges for p in range(first, end)]
    targets = torch.tensor([seq.token_ids[pos + 1] for seq, pos in positions])
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, targets[:, None])
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    k = max(seq.params.prompt_logprobs for seq, _ in positions)
    top_vals, top_ids = logprobs.topk(k, dim=-1) if k else (torch.empty(len(positions), 0),) * 2
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    for row, ((seq, pos), token, value) in enumerate(zip(positions, targets.tolist(), chosen[:, 0].tolist())):
        scored, want = seq.request.prompt_logprobs, seq.params.prompt_logprobs
        if len(scored) == pos + 1:      # not scored by an earlier run of these positions
            scored.append(Logprob(token, value, dict(zip(top_ids[row][:want], top_vals[row][:want])), ranks[row]))
