"""Request traces for the cluster simulator: Poisson arrivals, token-id prompts, fixed output lengths.

A trace is a list of `TraceRequest`, sorted by arrival. Prompts are token ids (not lengths) so that
the real router hashes them and a simulated prefix cache matches their blocks exactly as the engine
would. Everything is drawn from one `numpy` generator seeded by `seed`: a seed gives one trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VOCAB = 32000       # token ids are drawn from [100, VOCAB): ordinary text tokens of most vocabularies


@dataclass(frozen=True)
class TraceRequest:
    request_id: int
    arrival_s: float
    prompt_ids: tuple[int, ...]
    output_len: int                 # tokens generated (EOS ignored), >= 1
    group: int = -1                 # the shared prefix the prompt starts with (-1: none)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def _tokens(rng: np.random.Generator, n: int) -> tuple[int, ...]:
    return tuple(int(t) for t in rng.integers(100, VOCAB, size=n))


def _lengths(rng: np.random.Generator, bounds: tuple[int, int], n: int) -> np.ndarray:
    low, high = bounds
    if not 1 <= low <= high:
        raise ValueError(f"length bounds must satisfy 1 <= low <= high, got {bounds}")
    return rng.integers(low, high + 1, size=n)


def poisson_arrivals(rng: np.random.Generator, num_requests: int, rate: float) -> np.ndarray:
    """Arrival times of a Poisson process of `rate` requests per second, the first at 0."""
    if rate <= 0:
        raise ValueError(f"the arrival rate must be > 0, got {rate}")
    gaps = rng.exponential(1.0 / rate, size=num_requests)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def shared_prefix_trace(num_requests: int, rate: float, num_prefixes: int, prefix_len: int,
                        suffix_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0) -> list[TraceRequest]:
    """Requests that each start with one of `num_prefixes` system prompts of `prefix_len` tokens
    (chosen uniformly), then a suffix of their own: the workload prefix-aware routing is for."""
    rng = np.random.default_rng(seed)
    prefixes = [_tokens(rng, prefix_len) for _ in range(num_prefixes)]
    arrivals = poisson_arrivals(rng, num_requests, rate)
    groups = rng.integers(0, num_prefixes, size=num_requests)
    suffixes, outputs = _lengths(rng, suffix_len, num_requests), _lengths(rng, output_len, num_requests)
    return [TraceRequest(i, float(arrivals[i]), prefixes[groups[i]] + _tokens(rng, int(suffixes[i])),
                         int(outputs[i]), int(groups[i])) for i in range(num_requests)]


def random_trace(num_requests: int, rate: float, prompt_len: tuple[int, int], output_len: tuple[int, int],
                 seed: int = 0) -> list[TraceRequest]:
    """Requests with prompts of their own (no shared prefix) of uniform lengths."""
    rng = np.random.default_rng(seed)
    arrivals = poisson_arrivals(rng, num_requests, rate)
    prompts, outputs = _lengths(rng, prompt_len, num_requests), _lengths(rng, output_len, num_requests)
    return [TraceRequest(i, float(arrivals[i]), _tokens(rng, int(prompts[i])), int(outputs[i]))
            for i in range(num_requests)]
