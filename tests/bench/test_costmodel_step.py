"""The per-step cost model: non-negative least squares, the fit, and the step shapes recorded from
a real (tiny) engine."""

import json
from dataclasses import asdict

import numpy as np
import pytest

from ponder.bench.costmodel import (StepCostModel, StepShape, attention_reads, chunk_shape, fit_step_cost_model,
                                    nnls)
from ponder.bench.step_timing import PlanRecorder, SweepPoint, time_point


def _kkt_holds(A, y, x, tol=1e-8):
    """x >= 0 is optimal for min ||Ax - y|| s.t. x >= 0 iff the gradient vanishes where x > 0 and
    points into the constraint where x = 0."""
    gradient = A.T @ (y - A @ x)
    scale = np.abs(A.T @ y).max()
    return (x >= 0).all() and (np.abs(gradient[x > 0]) <= tol * scale).all() and (gradient[x == 0] <= tol * scale).all()


def test_nnls_recovers_non_negative_coefficients():
    rng = np.random.default_rng(0)
    A = np.column_stack([np.ones(200), rng.uniform(0, 1000, 200), rng.uniform(0, 64, 200), rng.uniform(0, 1e6, 200)])
    truth = np.array([0.01, 2e-4, 0.0, 3e-9])           # one true zero
    x = nnls(A, A @ truth)
    assert x == pytest.approx(truth, rel=1e-6, abs=1e-12)
    noisy = A @ truth * rng.uniform(0.97, 1.03, 200)
    assert nnls(A, noisy) == pytest.approx(truth, rel=0.05, abs=1e-4)


@pytest.mark.parametrize("seed", range(20))
def test_nnls_never_returns_negatives_and_is_optimal(seed):
    rng = np.random.default_rng(seed)
    A = rng.uniform(0, 1, (30, 5)) * rng.uniform(1e-3, 1e3, 5)      # badly scaled columns
    y = A @ rng.normal(0, 1, 5) + rng.normal(0, 0.1, 30)          # truths of either sign
    x = nnls(A, y)
    assert (x >= 0).all()
    assert _kkt_holds(A, y, x)


def test_chunk_shapes_count_what_attention_reads():
    assert attention_reads(0, 4) == 1 + 2 + 3 + 4
    assert attention_reads(10, 1) == 11                  # a decode row at position 10 reads 11 keys
    prefill, decode = chunk_shape(8, 4, decode=False), chunk_shape(20, 1, decode=True)
    assert prefill == StepShape(4, 0, 9 + 10 + 11 + 12, 42)
    assert prefill + decode == StepShape(4, 1, 42 + 21, 42)


def _shapes(rng, n):
    """Steps of p prompt tokens (a chunk at a random position) and d decode rows (random contexts)."""
    shapes = []
    for p, d in zip(rng.integers(0, 1024, n), rng.integers(0, 64, n)):
        prefill = attention_reads(int(rng.integers(0, 2048)), int(p))
        shapes.append(StepShape(int(p), int(d), prefill + int(d * rng.integers(1, 2048)), prefill))
    return shapes


def test_step_fit_recovers_coefficients_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    truth = StepCostModel(0.004, 1.5e-4, 6e-4, 2e-9, 1e-9)
    shapes = _shapes(rng, 300)
    seconds = [truth.predict(s.prompt_tokens, s.decode_rows, s.context_tokens, s.prefill_context_tokens)
               for s in shapes]
    model = fit_step_cost_model(shapes, seconds)
    got = (model.a, model.b, model.c, model.d, model.e)
    assert got == pytest.approx((truth.a, truth.b, truth.c, truth.d, truth.e), rel=1e-4)
    assert model.r2 == pytest.approx(1.0) and model.median_rel_error < 1e-6 and model.steps == 300
    (tmp_path / "m.json").write_text(json.dumps({"command": "costmodel", "step_cost_model": asdict(model)}))
    assert StepCostModel.load(str(tmp_path / "m.json")) == model


def test_step_fit_shrugs_off_slowed_steps_and_refuses_degenerate_sweeps():
    rng = np.random.default_rng(2)
    truth = StepCostModel(0.004, 1.5e-4, 6e-4, 2e-9, 0.0)
    shapes = _shapes(rng, 300)
    seconds = np.array([truth.predict(s.prompt_tokens, s.decode_rows, s.context_tokens) for s in shapes])
    seconds[::25] *= 20                                  # another process took the CPU on 4% of steps
    model = fit_step_cost_model(shapes, list(seconds))
    assert min(model.a, model.b, model.c, model.d, model.e) >= 0
    assert (model.a, model.b, model.c) == pytest.approx((truth.a, truth.b, truth.c), rel=0.1)
    with pytest.raises(ValueError, match="vary independently"):   # only decodes: no prompt tokens to fit
        fit_step_cost_model([StepShape(0, d, 10 * d, 0) for d in range(1, 10)], [0.01] * 9)


def test_the_recorder_sees_every_token_the_engine_computes(make_tiny_engine):
    engine = make_tiny_engine(max_num_batched_tokens=24, max_num_seqs=8, enable_prefix_caching=False)
    recorder = PlanRecorder(engine)
    point = SweepPoint(batch=6, prompt_len=20, output_len=5, budget=24, stagger=True)
    steps = time_point(engine, recorder, point, seed=0)
    stats = engine.stats()
    assert sum(s.shape.prompt_tokens for s in steps) == stats["prompt_tokens"] == 6 * 20
    # each request's first token is sampled by its last prefill chunk, the other 4 by decode rows
    assert sum(s.shape.decode_rows for s in steps) == stats["generation_tokens"] - 6 == 6 * 4
    assert len(steps) == stats["steps"] and all(s.seconds > 0 for s in steps)
    assert all(s.shape.prompt_tokens + s.shape.decode_rows <= 24 for s in steps)
    assert any(s.shape.prompt_tokens and s.shape.decode_rows for s in steps)     # staggered: mixed steps
    # keys read: each request's 20 prompt queries, then decode rows at positions 20..23
    assert sum(s.shape.context_tokens for s in steps) == 6 * (attention_reads(0, 20) + sum(range(21, 25)))
