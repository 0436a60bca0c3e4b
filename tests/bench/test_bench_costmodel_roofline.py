"""Cost-model fit and roofline math (and a tiny real measurement of the machine's peaks)."""

import pytest

from ponder.bench.costmodel import fit_cost_model
from ponder.bench.roofline import (MachinePeaks, Roofline, measure_bandwidth, measure_matmul, model_cost,
                                   roofline, run_percentages)
from tests.conftest import tiny_config, tiny_model


def test_cost_model_recovers_exact_coefficients():
    prompt = [100, 400, 100, 400, 250]
    output = [50, 50, 200, 200, 120]
    runtime = [0.5 + 0.002 * p + 0.03 * o for p, o in zip(prompt, output)]
    m = fit_cost_model(prompt, output, runtime)
    assert (m.a, m.b, m.c) == pytest.approx((0.5, 0.002, 0.03))
    assert m.r2 == pytest.approx(1.0)
    assert m.predict(1000, 10) == pytest.approx(0.5 + 2.0 + 0.3)


def test_cost_model_needs_independent_variation():
    with pytest.raises(ValueError):
        fit_cost_model([1, 2], [1, 2], [1.0, 2.0])
    with pytest.raises(ValueError):                     # output tokens proportional to prompt tokens
        fit_cost_model([1, 2, 3], [2, 4, 6], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        fit_cost_model([1, 2, 3], [1, 2], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}, {"qkv_bias": True}])
def test_model_cost_counts_the_models_parameters(overrides):
    cfg = tiny_config(**overrides)
    model = tiny_model(cfg)
    head = cfg.vocab_size * cfg.hidden_size
    # a tied model may keep its output head as a second (transposed) copy of the embedding
    copies = head if cfg.tie_word_embeddings and "lm_head.weight" in dict(model.named_parameters()) else 0
    numel = sum(p.numel() for p in model.parameters()) - copies
    cost = model_cost(cfg)
    assert cost.params == numel
    embed_only = 0 if cfg.tie_word_embeddings else head     # untied: the input table is not read per step
    norms = cfg.hidden_size * (2 * cfg.num_layers + 1)
    assert cost.matmul_params == numel - embed_only - norms
    assert cost.flops_per_token == 2 * cost.matmul_params
    assert cost.bytes_per_step == 4 * (numel - embed_only)


def test_roofline_bounds_and_percentages():
    cost = model_cost(tiny_config())
    roof = roofline(cost, MachinePeaks(bandwidth_gbs=40.0, matmul_gflops=120.0, threads=2))
    assert roof.bandwidth_tok_s == pytest.approx(40e9 / cost.bytes_per_step)
    assert roof.compute_tok_s == pytest.approx(120e9 / cost.flops_per_token)
    r = Roofline(bandwidth_tok_s=60.0, compute_tok_s=1000.0)
    assert (r.attainable(1), r.attainable(4), r.attainable(64)) == (60.0, 240.0, 1000.0)
    results = {"runs": [{"name": "ponder", "mode": "serve", "concurrency": 4,
                         "metrics": {"output_throughput": 120.0, "total_throughput": 500.0}}]}
    (row,) = run_percentages(results, r)
    assert row["pct_of_attainable"] == pytest.approx(50.0)
    assert row["pct_of_compute"] == pytest.approx(50.0)


def test_measurements_are_positive():
    assert measure_bandwidth(megabytes=8, reps=2) > 0
    assert measure_matmul(size=64, reps=2) > 0
