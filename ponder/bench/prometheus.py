"""Parse a Prometheus text exposition and turn two scrapes into an engine's own counters.

Tolerant by design: any `prefix:name` metrics are read (vLLM's `vllm:`, ponder's `ponder:`,
llama.cpp's `llamacpp:`), label sets are summed per name, histogram buckets are skipped, and the
known figures (prefix-cache hit rate, preemptions) are reported when their inputs are present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Scrape:
    values: dict[str, float] = field(default_factory=dict)   # metric name -> value summed over labels
    types: dict[str, str] = field(default_factory=dict)      # metric family -> counter/gauge/histogram/...


def parse_prometheus(text: str) -> Scrape:
    scrape = Scrape()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# TYPE"):
            parts = line.split()
            if len(parts) >= 4:
                scrape.types[parts[2]] = parts[3]
            continue
        if not line or line.startswith("#"):
            continue
        name, value = _sample(line)
        if name is None or name.endswith(("_bucket", "_created")):
            continue
        scrape.values[name] = scrape.values.get(name, 0.0) + value
    return scrape


def _sample(line: str) -> tuple[str | None, float]:
    """'name{a="b c"} 3.5 [ts]' -> ('name', 3.5); unparseable lines -> (None, nan)."""
    if "{" in line:
        name, _, rest = line.partition("{")
        rest = rest.rpartition("}")[2]
    else:
        name, _, rest = line.partition(" ")
    fields = rest.split()
    if not fields:
        return None, math.nan
    try:
        return name.strip(), float(fields[0])
    except ValueError:
        return None, math.nan


def _is_counter(name: str, types: dict[str, str]) -> bool:
    family = name.removesuffix("_total").removesuffix("_sum").removesuffix("_count")
    kind = types.get(name) or types.get(family)
    if kind is not None:
        return kind in ("counter", "histogram", "summary")
    return name.endswith(("_total", "_sum", "_count"))


def counter_deltas(before: Scrape, after: Scrape) -> dict[str, float]:
    """Counters as increments over the run (after - before); gauges as their value after."""
    out = {}
    for name, value in after.values.items():
        if _is_counter(name, after.types) and name in before.values:
            out[name] = value - before.values[name]
        else:
            out[name] = value
    return out


def _find(values: dict[str, float], *suffixes: str) -> float | None:
    """The first metric whose name without its `prefix:` ends with one of the suffixes."""
    for suffix in suffixes:
        for name, value in values.items():
            if name.rpartition(":")[2].endswith(suffix):
                return value
    return None


def engine_counters(before: Scrape | None, after: Scrape | None) -> dict:
    """Known figures over the run, plus every raw metric under 'raw'. Empty when nothing was scraped."""
    if after is None:
        return {}
    raw = counter_deltas(before or Scrape(), after)
    known = {}
    hits = _find(raw, "prefix_cache_hits_total", "prefix_cache_hits")
    queries = _find(raw, "prefix_cache_queries_total", "prefix_cache_queries")
    cached = _find(raw, "prompt_tokens_cached_total")
    prompt = _find(raw, "prompt_tokens_total")
    if hits is not None and queries:
        known["prefix_cache_hit_rate"] = hits / queries
    elif cached is not None and prompt:
        known["prefix_cache_hit_rate"] = cached / prompt
    else:
        rate = _find(raw, "prefix_cache_hit_rate")
        if rate is not None:
            known["prefix_cache_hit_rate"] = rate
    preemptions = _find(raw, "num_preemptions_total", "preemptions_total", "num_preemptions")
    if preemptions is not None:
        known["preemptions"] = preemptions
    for key, suffixes in (("prompt_tokens", ("prompt_tokens_total",)),
                          ("generation_tokens", ("generation_tokens_total", "tokens_predicted_total"))):
        value = _find(raw, *suffixes)
        if value is not None:
            known[key] = value
    return {**known, "raw": raw}
