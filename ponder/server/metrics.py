"""Prometheus metrics for GET /metrics, named as vLLM names them (prefix `ponder:`).

Latency histograms and the batch-size histogram are observed on the engine thread, once per step
(prometheus_client is thread-safe); gauges and token counters are read from the engine's stats
snapshot at scrape time, so they cost nothing per token.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ponder.engine.async_engine import StepReport

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServerMetrics:
    def __init__(self, model_name: str, engine_stats: Callable[[], dict]):
        self.registry = r = CollectorRegistry()
        label = ["model_name"]

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, label, buckets=buckets, registry=r).labels(model_name)

        self.ttft = histogram("ponder:time_to_first_token_seconds",
                              "Time from a request's arrival to its first generated token.", _LATENCY)
        self.itl = histogram("ponder:inter_token_latency_seconds",
                             "Time between two steps that gave a request new tokens.", _LATENCY)
        self.e2e = histogram("ponder:e2e_request_latency_seconds",
                             "Time from a request's arrival to its end.", _E2E)
        self.step_seqs = histogram("ponder:iteration_sequences",
                                   "Sequences that got a token in one engine step (the batch size).", _BATCH)
        self.step_tokens = histogram("ponder:iteration_tokens_total",
                                     "Prompt and generated tokens computed in one engine step.", _TOKENS)
        self.step_time = histogram("ponder:engine_step_seconds", "Time of one engine step.", _LATENCY)
        self._success = Counter("ponder:request_success", "Requests finished, by finish reason.",
                                label + ["finished_reason"], registry=r)
        self._rejected = Counter("ponder:request_rejected", "Requests refused with 503, by reason.",
                                 label + ["reason"], registry=r)
        self._model_name = model_name
        r.register(_EngineStatsCollector(model_name, engine_stats))

    def observe_step(self, report: StepReport) -> None:
        """Called on the engine thread after every step."""
        for seconds in report.ttfts:
            self.ttft.observe(seconds)
        for seconds in report.inter_token_latencies:
            self.itl.observe(seconds)
        for reason, seconds in report.finished:
            self.e2e.observe(seconds)
            self._success.labels(self._model_name, reason).inc()
        if report.num_sampled:
            self.step_seqs.observe(report.num_sampled)
        self.step_tokens.observe(report.num_tokens)
        self.step_time.observe(report.duration)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self._model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def scrape(self) -> bytes:
        """What GET /metrics answers (async: a front end over replicas asks each of them)."""
        return self.render()


class _EngineStatsCollector(Collector):
    """Gauges and counters straight from the engine's latest stats snapshot."""

    def __init__(self, model_name: str, engine_stats: Callable[[], dict]):
        self._model_name = model_name
        self._stats = engine_stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        used = 1.0 - s["kv_blocks_free"] / s["kv_blocks_total"]
        gauges = [
            ("num_requests_running", "Sequences running in the engine.", s["num_running"]),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", s["num_waiting"]),
            ("num_requests_in_flight", "Requests accepted and not finished.", s["requests_in_flight"]),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", used),
            ("kv_cache_blocks_total", "KV-cache blocks in the pool.", s["kv_blocks_total"]),
            ("kv_cache_blocks_free", "KV-cache blocks free or evictable.", s["kv_blocks_free"]),
            ("max_batch_seqs", "Most sequences in one engine step so far.", s["max_batch_seqs"]),
        ]
        counters = [
            ("prompt_tokens", "Prompt tokens computed (prefilled).", s["prompt_tokens"]),
            ("generation_tokens", "Tokens generated.", s["generation_tokens"]),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             s["prompt_tokens"] + s["prompt_tokens_cached"]),
            ("prefix_cache_hits", "Prompt tokens reused from the prefix cache.", s["prompt_tokens_cached"]),
            ("num_preemptions", "Sequences preempted (to be recomputed).", s["preemptions"]),
            ("engine_steps", "Engine steps run.", s["steps"]),
            # speculative decoding, as vLLM names them (acceptance rate = accepted / draft tokens;
            # mean accepted length = accepted / drafts)
            ("spec_decode_num_drafts", "Drafts verified (one per sequence and step).", s["spec_verified_seqs"]),
            ("spec_decode_num_draft_tokens", "Draft tokens verified.", s["spec_draft_tokens"]),
            ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", s["spec_accepted_tokens"]),
        ]
        for name, doc, value in gauges:
            metric = GaugeMetricFamily(f"ponder:{name}", doc, labels=["model_name"])
            metric.add_metric([self._model_name], value)
            yield metric
        for name, doc, value in counters:
            metric = CounterMetricFamily(f"ponder:{name}", doc, labels=["model_name"])
            metric.add_metric([self._model_name], value)
            yield metric
