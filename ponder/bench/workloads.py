"""Benchmark workloads: reproducible prompt sets."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]       # token ids
    output_len: int
    ignore_eos: bool = True

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return self.output_len * len(self.prompts)


def random_tokens(num_requests: int, input_low: int, input_high: int, output_len: int, vocab_size: int,
                  seed: int = 0, name: str = "random") -> Workload:
    """Random-token prompts with uniform lengths in [input_low, input_high] (the vLLM 'random' dataset).

    Token ids come from the lower part of the vocabulary (ordinary text tokens, no specials)."""
    rng = random.Random(seed)
    hi = min(vocab_size, 32000)
    prompts = [[rng.randrange(100, hi) for _ in range(rng.randint(input_low, input_high))]
               for _ in range(num_requests)]
    return Workload(name, prompts, output_len)


def offline_64(vocab_size: int, seed: int = 0) -> Workload:
    """The 'offline-64' workload of the engine-core issue: 64 requests, prompts 64-256, 128 out."""
    return random_tokens(64, 64, 256, 128, vocab_size, seed, name="offline-64")
