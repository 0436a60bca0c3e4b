"""GET /metrics over replicas: every replica's own metrics (server/metrics.py's, observed in the
replica on its engine thread) with a `replica` label added, merged into one exposition, plus what
the front end counts itself (requests refused with 503).

The replicas' texts are parsed with prometheus_client's parser and re-exposed through a collector,
so the output stays valid Prometheus text however many replicas there are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ponder.distributed.frontend import ReplicaSet



def merge_replica_metrics(texts: dict[int, bytes]) -> list[Metric]:
    """The families of several replicas' Prometheus texts as one list, each sample labelled with
    its replica; families with no samples are left out (the replicas' request_rejected counter:
    the front end is what refuses requests, and counts them)."""
    merged: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode()):
            target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            target.samples.extend(s._replace(labels={**s.labels, "replica": str(replica)}) for s in family.samples)
    return [family for family in merged.values() if family.samples]


class _Merged(Collector):
    def __init__(self):
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class ReplicaMetrics:
    """The server's metrics object (`scrape`, `rejected`) for a ReplicaSet."""

    def __init__(self, model_name: str, replicas: "ReplicaSet"):
        self.replicas, self._model_name = replicas, model_name
        self.registry = CollectorRegistry()
        self._rejected = Counter("ponder:request_rejected", "Requests refused with 503, by reason.",
                                 ["model_name", "reason"], registry=self.registry)
        self._merged = _Merged()
        self.registry.register(self._merged)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self._model_name, reason).inc()

    async def scrape(self) -> bytes:
        self._merged.families = merge_replica_metrics(await self.replicas.metrics_texts())
        return generate_latest(self.registry)
