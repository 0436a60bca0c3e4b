"""The /metrics scraper: tolerant parsing and the known counters of vLLM-, ponder- and llama.cpp-style names."""

import pytest

from ponder.bench.prometheus import counter_deltas, engine_counters, parse_prometheus

BEFORE = """\
# HELP ponder:prompt_tokens_total Prompt tokens.
# TYPE ponder:prompt_tokens_total counter
ponder:prompt_tokens_total{model_name="smol"} 100
# TYPE ponder:num_preemptions_total counter
ponder:num_preemptions_total{model_name="smol"} 1
ponder:prefix_cache_queries_total{model_name="smol"} 100
ponder:prefix_cache_hits_total{model_name="smol"} 0
# TYPE ponder:num_requests_running gauge
ponder:num_requests_running{model_name="smol"} 0
# TYPE ponder:time_to_first_token_seconds histogram
ponder:time_to_first_token_seconds_bucket{le="0.1",model_name="smol"} 3
ponder:time_to_first_token_seconds_bucket{le="+Inf",model_name="smol"} 4
ponder:time_to_first_token_seconds_sum{model_name="smol"} 0.5
ponder:time_to_first_token_seconds_count{model_name="smol"} 4
ponder:time_to_first_token_seconds_created{model_name="smol"} 1.7e9
"""

AFTER = """\
# TYPE ponder:prompt_tokens_total counter
ponder:prompt_tokens_total{model_name="smol"} 400
# TYPE ponder:num_preemptions_total counter
ponder:num_preemptions_total{model_name="smol"} 4
ponder:prefix_cache_queries_total{model_name="smol"} 500
ponder:prefix_cache_hits_total{model_name="smol"} 100
# TYPE ponder:num_requests_running gauge
ponder:num_requests_running{model_name="smol"} 2
ponder:time_to_first_token_seconds_bucket{le="0.1",model_name="smol"} 9
ponder:time_to_first_token_seconds_sum{model_name="smol"} 1.5
ponder:time_to_first_token_seconds_count{model_name="smol"} 8
weird line without value
process_cpu_seconds_total 12.5 1700000000
"""


def test_parse_sums_label_sets_and_skips_buckets():
    text = 'a:x_total{k="1"} 2\na:x_total{k="2, with } brace"} 3\nb 1.5e3\nh_bucket{le="1"} 7\n'
    scrape = parse_prometheus(text)
    assert scrape.values == {"a:x_total": 5.0, "b": 1500.0}
    assert parse_prometheus(BEFORE).types["ponder:num_requests_running"] == "gauge"


def test_counters_become_deltas_and_gauges_stay_values():
    deltas = counter_deltas(parse_prometheus(BEFORE), parse_prometheus(AFTER))
    assert deltas["ponder:prompt_tokens_total"] == 300
    assert deltas["ponder:time_to_first_token_seconds_count"] == 4
    assert deltas["ponder:time_to_first_token_seconds_sum"] == pytest.approx(1.0)
    assert deltas["ponder:num_requests_running"] == 2
    assert deltas["process_cpu_seconds_total"] == 12.5          # not in `before`: its value
    assert not any(k.endswith(("_bucket", "_created")) for k in deltas)


def test_known_counters_vllm_style():
    c = engine_counters(parse_prometheus(BEFORE), parse_prometheus(AFTER))
    assert c["prefix_cache_hit_rate"] == pytest.approx(100 / 400)
    assert c["preemptions"] == 3
    assert c["prompt_tokens"] == 300
    assert "raw" in c


def test_known_counters_llamacpp_style_and_missing():
    text = ("llamacpp:prompt_tokens_total 90\nllamacpp:prompt_tokens_cached_total 30\n"
            "llamacpp:tokens_predicted_total 32\n")
    c = engine_counters(None, parse_prometheus(text))
    assert c["prefix_cache_hit_rate"] == pytest.approx(30 / 90)
    assert c["generation_tokens"] == 32
    assert "preemptions" not in c
    assert engine_counters(None, None) == {}
    only_gauge = engine_counters(None, parse_prometheus("vllm:gpu_prefix_cache_hit_rate 0.4\n"))
    assert only_gauge["prefix_cache_hit_rate"] == pytest.approx(0.4)
