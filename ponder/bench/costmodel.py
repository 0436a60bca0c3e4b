"""Cost models fitted to ponder's own timings.

Per run (`fit_cost_model`): runtime ≈ a + b·prompt_tokens + c·output_tokens, by least squares.

Per step (`fit_step_cost_model`): one engine step's seconds ≈ a + b·prompt tokens computed in the
step + c·decode rows + d·context tokens read by attention (each query position reads every key
before it, summed over the step's queries) + e·the part of that context read by prefill queries.
The coefficients are fitted non-negative (time never falls as work grows), by `nnls`. The
cluster simulator (ponder/distributed/simulate.py) prices every simulated step with `predict`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CostModel:
    a: float        # fixed seconds per run
    b: float        # seconds per prompt token
    c: float        # seconds per output token
    r2: float       # coefficient of determination of the fit

    def predict(self, prompt_tokens: float, output_tokens: float) -> float:
        return self.a + self.b * prompt_tokens + self.c * output_tokens


def r_squared(y: np.ndarray, fitted: np.ndarray) -> float:
    spread = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - fitted) ** 2).sum()) / spread if spread > 0 else 1.0


def fit_cost_model(prompt_tokens: list[float], output_tokens: list[float], runtimes: list[float]) -> CostModel:
    """Least-squares fit over runs; needs at least 3 runs that vary prompt and output tokens apart."""
    if not len(prompt_tokens) == len(output_tokens) == len(runtimes):
        raise ValueError("prompt_tokens, output_tokens and runtimes must have the same length")
    X = np.column_stack([np.ones(len(runtimes)), prompt_tokens, output_tokens]).astype(np.float64)
    y = np.asarray(runtimes, dtype=np.float64)
    if len(y) < 3 or np.linalg.matrix_rank(X) < 3:
        raise ValueError("the cost model needs >= 3 runs whose prompt and output token counts vary independently")
    (a, b, c), *_ = np.linalg.lstsq(X, y, rcond=None)
    return CostModel(float(a), float(b), float(c), r_squared(y, X @ np.array([a, b, c])))


# -- non-negative least squares ---------------------------------------------------------------------

def nnls(A: np.ndarray, y: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """argmin ||A x - y|| subject to x >= 0 (Lawson and Hanson's active-set method).

    Columns are scaled to unit norm first (step features span six orders of magnitude); scaling by a
    positive factor keeps the sign constraint, so the answer is scaled back exactly."""
    A, y = np.asarray(A, dtype=np.float64), np.asarray(y, dtype=np.float64)
    norms = np.linalg.norm(A, axis=0)
    norms[norms == 0] = 1.0
    A = A / norms
    n = A.shape[1]
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(float).eps * max(A.shape) * max(1.0, float(np.abs(A).max(initial=0.0)))
    for _ in range(max_iter or 3 * n + 30):
        gradient = A.T @ (y - A @ x)
        free = ~passive & (gradient > tol)
        if not free.any():
            break
        passive[np.argmax(np.where(free, gradient, -np.inf))] = True
        while True:                                  # solve on the passive set; step back while it leaves x >= 0
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], y, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            shrinking = passive & (z <= 0)
            alpha = np.min(x[shrinking] / (x[shrinking] - z[shrinking]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return np.maximum(x, 0.0) / norms


# -- per-step model ---------------------------------------------------------------------------------

STEP_FEATURES = ("prompt_tokens", "decode_rows", "context_tokens", "prefill_context_tokens")


@dataclass(frozen=True)
class StepShape:
    """What one engine step computes (the features of the step cost model)."""
    prompt_tokens: int = 0              # tokens computed that are not a decode row's one token
    decode_rows: int = 0                # sequences computing their one next token
    context_tokens: int = 0             # keys read by attention, summed over every query of the step
    prefill_context_tokens: int = 0     # the part of context_tokens read by prefill queries

    def __add__(self, other: StepShape) -> StepShape:
        return StepShape(*(getattr(self, n) + getattr(other, n) for n in STEP_FEATURES))

    def features(self) -> list[float]:
        return [1.0] + [float(getattr(self, name)) for name in STEP_FEATURES]


def attention_reads(start: int, num_tokens: int) -> int:
    """Keys read by `num_tokens` queries at positions start.. (each reads itself and all before)."""
    return num_tokens * start + num_tokens * (num_tokens + 1) // 2


def chunk_shape(start: int, num_tokens: int, decode: bool) -> StepShape:
    """One sequence's part of a step."""
    context = attention_reads(start, num_tokens)
    return StepShape(0, num_tokens, context, 0) if decode else StepShape(num_tokens, 0, context, context)


@dataclass
class StepCostModel:
    a: float            # seconds per step, whatever it computes (scheduling, Python, a weight read)
    b: float            # seconds per prompt token computed
    c: float            # seconds per decode row
    d: float            # seconds per context token read by attention
    e: float = 0.0      # extra seconds per context token read by a prefill query
    r2: float = 1.0
    median_rel_error: float = 0.0
    steps: int = 0
    notes: dict = field(default_factory=dict)

    def predict(self, prompt_tokens: float = 0, decode_rows: float = 0, context_tokens: float = 0,
                prefill_context_tokens: float = 0) -> float:
        """Seconds of one step computing that much (the simulator's price of a step)."""
        return (self.a + self.b * prompt_tokens + self.c * decode_rows + self.d * context_tokens
                + self.e * prefill_context_tokens)

    def describe(self) -> str:
        return (f"step ≈ {self.a * 1e3:.3f} ms + {self.b * 1e6:.3f} µs × prompt token + "
                f"{self.c * 1e6:.3f} µs × decode row + {self.d * 1e9:.3f} ns × context token + "
                f"{self.e * 1e9:.3f} ns × prefill context token   (R² = {self.r2:.3f}, median |error| "
                f"{100 * self.median_rel_error:.1f}%, {self.steps} steps)")

    @classmethod
    def load(cls, path: str) -> StepCostModel:
        """The model in a results JSON of `ponder bench costmodel --per-step` (its "step_cost_model")."""
        with open(path) as f:
            return cls(**json.load(f)["step_cost_model"])


def fit_step_cost_model(shapes: list[StepShape], seconds: list[float]) -> StepCostModel:
    """Non-negative least squares over steps, on relative errors (each step's row divided by its
    time): a 20 ms decode counts as much as a 2 s prefill, and a step slowed by another process on
    the machine (time only ever grows) cannot pull the fit further than a relative error of 1.
    Needs steps whose features vary apart."""
    if len(shapes) != len(seconds):
        raise ValueError("shapes and seconds must have the same length")
    X = np.array([s.features() for s in shapes], dtype=np.float64).reshape(len(shapes), 1 + len(STEP_FEATURES))
    y = np.asarray(seconds, dtype=np.float64)
    if len(y) < X.shape[1] or np.linalg.matrix_rank(X) < X.shape[1]:
        raise ValueError("the step cost model needs steps whose prompt tokens, decode rows and context "
                         "vary independently (mix prefill chunks and decodes at several lengths)")
    if (y <= 0).any():
        raise ValueError("step times must be positive")
    coef = nnls(X / y[:, None], np.ones_like(y))
    fitted = X @ coef
    return StepCostModel(*(float(c) for c in coef), r2=r_squared(y, fitted),
                         median_rel_error=float(np.median(np.abs(fitted - y) / y)), steps=len(y))
