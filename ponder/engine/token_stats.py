"""Per-token statistics over the full next-token distribution, for sequences that ask for them:
Self-Certainty (Kang et al. 2025), the KL divergence of the uniform distribution from the model's,
KL(U || p) = -log V - mean_v log p_v, over the raw logits before any truncation. A think scorer
averages it over a trace; it costs one reduction over the step's log-softmax (a sampler extension),
where top-k logprobs could not give it."""

from __future__ import annotations

import math

import torch

from ponder.engine.sequence import Action, Sequence


class SelfCertaintyExtension:
    name = "self_certainty"

    def before_forward(self, seqs: list) -> None:
        pass

    def prepare(self, rows: list) -> "_CertaintyRows | None":
        wanted = [i for i, seq in enumerate(rows) if isinstance(seq, Sequence) and seq.self_certainty is not None
                  and not (seq.control is not None and seq.control.action is Action.PROBE)]
        return _CertaintyRows(wanted) if wanted else None


class _CertaintyRows:
    name = SelfCertaintyExtension.name
    reads_distribution = True

    def __init__(self, rows: list[int]):
        self.rows = rows

    def edit_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def observe(self, logprobs: torch.Tensor, tokens: torch.Tensor) -> dict[int, float]:
        rows = torch.tensor(self.rows, dtype=torch.long)
        values = (-math.log(logprobs.shape[1]) - logprobs[rows].mean(dim=-1)).tolist()
        return dict(zip(self.rows, values))
