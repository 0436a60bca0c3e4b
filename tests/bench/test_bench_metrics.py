"""Metric math on synthetic timestamps: percentiles, TTFT, TPOT, ITL, E2EL, throughput, goodput."""

import math

import pytest

from ponder.bench.metrics import RequestRecord, Summary, cdf, compute_metrics, meets_slos, parse_slos


def rec(start, chunks, end, prompt=10, out=None, error=None):
    return RequestRecord(prompt, len(chunks) if out is None else out, start, end, list(chunks), error)


def test_summary_percentiles_are_linear_interpolation_in_ms():
    s = Summary.of([v / 1000.0 for v in range(1, 101)])      # 1..100 ms
    assert s.mean == pytest.approx(50.5)
    assert s.p50 == pytest.approx(50.5)
    assert s.p90 == pytest.approx(90.1)
    assert s.p99 == pytest.approx(99.01)
    one = Summary.of([0.25])
    assert (one.mean, one.p50, one.p90, one.p99) == (250.0, 250.0, 250.0, 250.0)
    assert Summary.of([]) is None


def test_ttft_tpot_itl_e2el_of_one_request():
    r = rec(start=10.0, chunks=[10.5, 10.6, 10.8, 11.1], end=11.1)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2el == pytest.approx(1.1)
    assert r.tpot == pytest.approx((11.1 - 10.5) / 3)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])


def test_tpot_counts_tokens_not_chunks():
    # two chunks carrying 5 tokens (a server that sends several tokens per chunk)
    r = rec(start=0.0, chunks=[0.2, 1.0], end=1.0, out=5)
    assert r.tpot == pytest.approx(0.8 / 4)
    assert r.itls == pytest.approx([0.8])


def test_one_token_and_unstreamed_requests():
    one = rec(0.0, [0.3], 0.3)
    assert one.tpot is None and one.itls == [] and one.ttft == pytest.approx(0.3)
    blind = RequestRecord(5, 8, 0.0, 2.0, [])                # no chunk times (non-streaming)
    assert blind.ttft is None and blind.tpot is None and blind.e2el == 2.0


def test_compute_metrics_pools_itls_and_skips_failures():
    records = [rec(0.0, [0.1, 0.2, 0.4], 0.4, prompt=4),
               rec(0.0, [0.3, 0.5, 0.6], 0.6, prompt=6),
               rec(0.0, [], None, prompt=100, error="HTTP 500")]
    m = compute_metrics(records, duration_s=2.0)
    assert (m.completed, m.failed) == (2, 1)
    assert (m.prompt_tokens, m.output_tokens) == (10, 6)
    assert m.request_throughput == pytest.approx(1.0)
    assert m.output_throughput == pytest.approx(3.0)
    assert m.total_throughput == pytest.approx(8.0)
    assert m.ttft_ms.mean == pytest.approx(200.0)
    assert m.itl_ms.mean == pytest.approx((100 + 200 + 200 + 100) / 4)     # pooled: 4 gaps
    assert m.tpot_ms.mean == pytest.approx(((0.3 / 2) + (0.3 / 2)) / 2 * 1000)
    assert m.e2el_ms.p50 == pytest.approx(500.0)
    assert m.goodput is None and m.good_requests is None


def test_goodput_counts_requests_within_every_slo():
    fast = rec(0.0, [0.1, 0.12, 0.14], 0.14)            # ttft 100 ms, tpot 20 ms
    slow_start = rec(0.0, [0.9, 0.92, 0.94], 0.94)      # ttft 900 ms
    slow_decode = rec(0.0, [0.1, 0.3, 0.5], 0.5)        # tpot 200 ms
    one_token = rec(0.0, [0.2], 0.2)                    # tpot counts as 0
    slos = parse_slos(["ttft:500", "tpot:50"])
    assert [meets_slos(r, slos) for r in (fast, slow_start, slow_decode, one_token)] == [True, False, False, True]
    m = compute_metrics([fast, slow_start, slow_decode, one_token], 4.0, slos)
    assert m.good_requests == 2
    assert m.goodput == pytest.approx(0.5)
    assert not meets_slos(RequestRecord(5, 3, 0.0, 1.0, []), {"ttft": 1e9})       # TTFT unknown
    assert meets_slos(RequestRecord(5, 3, 0.0, 1.0, []), {"e2el": 1000.0})


def test_parse_slos_validates():
    assert parse_slos(None) == {}
    assert parse_slos(["e2el:2000"]) == {"e2el": 2000.0}
    for bad in (["ttft"], ["latency:5"], ["ttft:fast"], ["tpot:0"]):
        with pytest.raises(ValueError):
            parse_slos(bad)


def test_duration_must_be_positive_and_cdf_is_monotone():
    with pytest.raises(ValueError):
        compute_metrics([], 0.0)
    xs, ys = cdf([3.0, 1.0, 2.0])
    assert list(xs) == [1.0, 2.0, 3.0]
    assert list(ys) == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert math.isclose(ys[-1], 1.0)
