"""Serving metrics from per-request timestamps: pure functions, no clocks, no I/O.

Definitions follow vLLM's benchmark_serving:
- TTFT: first streamed chunk - request sent.
- TPOT: (end - first chunk) / (output tokens - 1), per request (requests of one token have none).
- ITL: gaps between consecutive chunks, pooled over all requests.
- E2EL: end - request sent.
- goodput: requests per second that meet every SLO (ttft, tpot, e2el, in ms).
Summaries are in milliseconds; throughputs are per second of the run's wall time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SLO_KEYS = ("ttft", "tpot", "e2el")
PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one request did, in seconds on one monotonic clock."""

    prompt_tokens: int
    output_tokens: int = 0
    start: float = 0.0                                   # when the request was sent
    end: float | None = None                             # when its last byte arrived
    chunk_times: list[float] = field(default_factory=list)  # arrival of each streamed chunk / step
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2el(self) -> float | None:
        return self.end - self.start if self.end is not None else None

    @property
    def tpot(self) -> float | None:
        if not self.chunk_times or self.end is None or self.output_tokens < 2:
            return None
        return (self.end - self.chunk_times[0]) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


@dataclass
class Summary:
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values_s: list[float]) -> "Summary | None":
        """Summary in milliseconds of values in seconds; None for no values."""
        if not values_s:
            return None
        ms = np.asarray(values_s, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
        return cls(float(ms.mean()), p50, p90, p99)


@dataclass
class BenchMetrics:
    completed: int
    failed: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    request_throughput: float          # completed requests / s
    output_throughput: float           # output tokens / s
    total_throughput: float            # (prompt + output) tokens / s
    ttft_ms: Summary | None
    tpot_ms: Summary | None
    itl_ms: Summary | None
    e2el_ms: Summary | None
    good_requests: int | None = None   # None when no SLOs were given
    goodput: float | None = None       # good requests / s


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"an SLO is KEY:MS with KEY one of {', '.join(SLO_KEYS)}; got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"SLO {item!r}: {value!r} is not a number of milliseconds") from None
        if ms <= 0:
            raise ValueError(f"SLO {item!r} must be > 0 ms")
        slos[key] = ms
    return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    """A request is good if it succeeded and is within every SLO. A one-token request's TPOT is 0
    (as in vLLM); an unknown TTFT (no streaming) fails a TTFT SLO."""
    if not record.ok:
        return False
    values = {"ttft": record.ttft, "tpot": record.tpot if record.output_tokens >= 2 else 0.0,
              "e2el": record.e2el}
    return all(values[k] is not None and values[k] * 1000.0 <= ms for k, ms in slos.items())


def compute_metrics(records: list[RequestRecord], duration_s: float,
                    slos: dict[str, float] | None = None) -> BenchMetrics:
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    done = [r for r in records if r.ok]
    prompt = sum(r.prompt_tokens for r in done)
    output = sum(r.output_tokens for r in done)
    good = sum(meets_slos(r, slos) for r in done) if slos else None
    return BenchMetrics(
        completed=len(done), failed=len(records) - len(done), duration_s=duration_s,
        prompt_tokens=prompt, output_tokens=output,
        request_throughput=len(done) / duration_s, output_throughput=output / duration_s,
        total_throughput=(prompt + output) / duration_s,
        ttft_ms=Summary.of(_present(r.ttft for r in done)),
        tpot_ms=Summary.of(_present(r.tpot for r in done)),
        itl_ms=Summary.of([gap for r in done for gap in r.itls]),
        e2el_ms=Summary.of(_present(r.e2el for r in done)),
        good_requests=good, goodput=good / duration_s if good is not None else None)


def cdf(values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and their empirical cumulative fractions (for latency CDF plots)."""
    xs = np.sort(np.asarray(values, dtype=np.float64))
    return xs, np.arange(1, len(xs) + 1) / max(len(xs), 1)


def _present(values) -> list[float]:
    return [v for v in values if v is not None]


@dataclass
class RunResult:
    """One measured run: an engine on a workload at one concurrency."""

    name: str                        # "ponder", "hf", "llama.cpp", or a base URL's label
    mode: str                        # "offline" or "serve"
    concurrency: int                 # most requests in flight (batch size for static batching)
    workload: dict
    records: list[RequestRecord]
    duration_s: float
    metrics: BenchMetrics
    request_rate: float = float("inf")
    engine_counters: dict = field(default_factory=dict)   # prefix-cache hit rate, preemptions, ...
    config: dict = field(default_factory=dict)
