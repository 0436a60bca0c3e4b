"""Fit runtime ≈ a + b·prompt_tokens + c·output_tokens to a sweep of runs (least squares)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CostModel:
    a: float        # fixed seconds per run
    b: float        # seconds per prompt token
    c: float        # seconds per output token
    r2: float       # coefficient of determination of the fit

    def predict(self, prompt_tokens: float, output_tokens: float) -> float:
        return self.a + self.b * prompt_tokens + self.c * output_tokens


def fit_cost_model(prompt_tokens: list[float], output_tokens: list[float], runtimes: list[float]) -> CostModel:
    """Least-squares fit over runs; needs at least 3 runs that vary prompt and output tokens apart."""
    if not len(prompt_tokens) == len(output_tokens) == len(runtimes):
        raise ValueError("prompt_tokens, output_tokens and runtimes must have the same length")
    X = np.column_stack([np.ones(len(runtimes)), prompt_tokens, output_tokens]).astype(np.float64)
    y = np.asarray(runtimes, dtype=np.float64)
    if len(y) < 3 or np.linalg.matrix_rank(X) < 3:
        raise ValueError("the cost model needs >= 3 runs whose prompt and output token counts vary independently")
    (a, b, c), *_ = np.linalg.lstsq(X, y, rcond=None)
    residual = y - X @ np.array([a, b, c])
    spread = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / spread if spread > 0 else 1.0
    return CostModel(float(a), float(b), float(c), r2)
