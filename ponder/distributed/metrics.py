"""GET /metrics over replicas: every replica's own metrics (server/metrics.py's, observed in the
replica on its engine thread) with a `replica` label added (and `role`, prefill or decode, in P/D
mode), merged into one exposition, plus what
the front end counts itself (requests refused with 503).

The replicas' texts are parsed with prometheus_client's parser and re-exposed through a collector,
so the output stays valid Prometheus text however many replicas there are.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector


def merge_replica_metrics(texts: list[tuple[dict[str, str], bytes]]) -> list[Metric]:
    """The families of several replicas' Prometheus texts as one list, each sample given its
    replica's labels (`replica`, and `role` in P/D mode); families with no samples are left out
    (the replicas' request_rejected counter: the front end is what refuses requests, and counts them)."""
    merged: dict[str, Metric] = {}
    for labels, text in texts:
        for family in text_string_to_metric_families(text.decode()):
            target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            target.samples.extend(s._replace(labels={**s.labels, **labels}) for s in family.samples)
    return [family for family in merged.values() if family.samples]


def sum_stats(stats: list[dict]) -> dict:
    """Engine stats of several engines as one: numbers add up, the rest is the first engine's."""
    total: dict = {}
    for s in stats:
        for key, value in s.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key in total:
                total[key] += value
            else:
                total.setdefault(key, value)
    return total


class _Merged(Collector):
    def __init__(self):
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class ReplicaMetrics:
    """The server's metrics object (`scrape`, `rejected`) for a ReplicaSet (or the P/D front end)."""

    def __init__(self, model_name: str, replicas):     # a ReplicaSet or DisaggregatedReplicas
        self.replicas, self._model_name = replicas, model_name
        self.registry = CollectorRegistry()
        self._rejected = Counter("ponder:request_rejected", "Requests refused with 503, by reason.",
                                 ["model_name", "reason"], registry=self.registry)
        self._merged = _Merged()
        self.registry.register(self._merged)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self._model_name, reason).inc()

    async def scrape(self) -> bytes:
        self._merged.families = merge_replica_metrics(await self.replicas.labelled_metrics())
        return generate_latest(self.registry)
