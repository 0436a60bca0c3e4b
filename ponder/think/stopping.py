"""When adaptive consistency stops sampling: stopping rules over the ballots drawn so far, checked
after every wave (strategies.adaptive_consistency, program of thought in waves, and the pool replay
in bench/pool_stats.py).

- `beta` (Adaptive-Consistency, Aggarwal et al. 2023): the two largest vote counts a and b; stop once
  P(p_top > p_second) ≥ confidence under the Beta(a + 1, b + 1) posterior.
- `dirichlet` (the same paper's multi-answer rule): every answer seen so far, plus one for an answer
  not seen yet, under the Dirichlet(counts + 1) posterior; stop once P(the leader's share is the
  largest) ≥ confidence. Stricter than `beta` when votes are spread over many answers.
- `window` (ESC, Li et al. 2024): stop once one whole wave agrees on one answer (`confidence` unused).
"""

from __future__ import annotations

import math
from functools import lru_cache

from ponder.think.voting import tally


def settled(rule: str, ballots: list[str | None], wave: int, confidence: float) -> bool:
    """Whether sampling stops after these ballots (None: a sample that casts no vote), the last
    `wave` of them the wave just drawn."""
    if rule not in _RULES:
        raise ValueError(f"unknown stopping rule {rule!r}: one of {', '.join(STOPPING_RULES)}")
    return _RULES[rule](ballots, wave, confidence)


def majority_settled(votes: dict[str, float], confidence: float) -> bool:
    """P(p_top > p_second) ≥ confidence, with p_top / (p_top + p_second) ~ Beta(a + 1, b + 1) for
    a and b the two largest vote counts: that is P(Binomial(a + b + 1, 1/2) ≤ a)."""
    counts = sorted((int(v) for v in votes.values()), reverse=True)
    if not counts:
        return False
    a, b = counts[0], counts[1] if len(counts) > 1 else 0
    trials = a + b + 1
    return sum(math.comb(trials, j) for j in range(a + 1)) / 2 ** trials >= confidence


def dirichlet_settled(votes: dict[str, float], confidence: float) -> bool:
    counts = sorted((int(v) for v in votes.values()), reverse=True)
    return bool(counts) and leader_probability(tuple(counts)) >= confidence


@lru_cache(maxsize=None)
def leader_probability(counts: tuple[int, ...]) -> float:
    """P(p_1 > p_i for every other i) for p ~ Dirichlet(c_1 + 1, ..., c_m + 1, 1): the leader's
    count first, the last category an answer not seen yet. With X_i ~ Gamma(alpha_i) independent
    (p is X normalised), that is the integral of X_1's density times the others' CDFs, in closed
    form for integer alphas, integrated by Simpson's rule."""
    alphas = [c + 1 for c in counts] + [1]
    lead, others = alphas[0], alphas[1:]
    upper, steps = 4.0 * max(alphas) + 40.0, 800           # the density is negligible past `upper`
    h = upper / steps

    def integrand(x: float) -> float:
        value = math.exp((lead - 1) * math.log(x) - x - math.lgamma(lead)) if x > 0 else float(lead == 1)
        for a in others:
            value *= gamma_cdf(a, x)
        return value

    total = integrand(0.0) + integrand(upper)
    total += sum((4 if i % 2 else 2) * integrand(i * h) for i in range(1, steps))
    return min(1.0, total * h / 3)


def gamma_cdf(alpha: int, x: float) -> float:
    """P(Gamma(alpha, 1) ≤ x) for an integer alpha: 1 - e^-x * sum_{j < alpha} x^j / j!."""
    term, partial = 1.0, 1.0
    for j in range(1, alpha):
        term *= x / j
        partial += term
    return max(0.0, 1.0 - math.exp(-x) * partial)


def window_settled(ballots: list[str | None], wave: int) -> bool:
    last = ballots[-wave:]
    return len(ballots) >= wave and last[0] is not None and all(b == last[0] for b in last)


# rule -> settled(ballots, wave, confidence)
_RULES = {"beta": lambda ballots, wave, confidence: majority_settled(tally(ballots), confidence),
          "dirichlet": lambda ballots, wave, confidence: dirichlet_settled(tally(ballots), confidence),
          "window": lambda ballots, wave, confidence: window_settled(ballots, wave)}
STOPPING_RULES = tuple(_RULES)
