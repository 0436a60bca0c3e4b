"""Votes over normalised answers and the unbiased pass@k estimator."""

from __future__ import annotations

from collections import defaultdict


def tally(answers: list[str | None], weights: list[float] | None = None) -> dict[str, float]:
    """Total weight per answer (1 each without weights); answers that could not be extracted do
    not vote. Keys keep first-seen order, so ties go to the answer seen first."""
    totals: dict[str, float] = defaultdict(float)
    for i, answer in enumerate(answers):
        if answer is not None:
            totals[answer] += 1.0 if weights is None else float(weights[i])
    return dict(totals)


def winner(totals: dict[str, float]) -> str | None:
    best = None
    for answer, votes in totals.items():
        if best is None or votes > totals[best]:
            best = answer
    return best


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c correct) is correct:
    1 - C(n-c, k) / C(n, k), computed as a stable product (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss
