"""Probes: a program asks for the next-token logprobs of chosen ids after a sequence (think's
scorers ask "is this right? yes/no"). They are a sampler extension: the row is computed and its
distribution read like any other, and the engine takes no token from it."""

from __future__ import annotations

import torch

from ponder.engine.sequence import Action


class ProbeExtension:
    name = "probe"

    def before_forward(self, seqs: list) -> None:
        pass

    def prepare(self, rows: list) -> "_ProbeRows | None":
        wanted = {i: seq.control.probe_token_ids for i, seq in enumerate(rows)
                  if seq.control is not None and seq.control.action is Action.PROBE}
        return _ProbeRows(wanted) if wanted else None


class _ProbeRows:
    name = ProbeExtension.name
    reads_distribution = True

    def __init__(self, wanted: dict[int, tuple[int, ...]]):
        self.wanted = wanted

    def edit_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def observe(self, logprobs: torch.Tensor, tokens: torch.Tensor) -> dict[int, list[float]]:
        return {row: logprobs[row, list(ids)].tolist() for row, ids in self.wanted.items()}
