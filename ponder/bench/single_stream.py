"""One stream at batch 1, the way llama.cpp's `llama-bench` measures it: pp and tg tok/s.

- ppN: prefill an N-token prompt and produce the first token; tok/s = N / that time.
- tgM: a 1-token prompt, then M generated tokens (EOS ignored); tok/s = M / time to the last token.
  (The 1-token prompt's forward is the first of the M decode-sized steps, as in llama-bench.)

Greedy, the prefix cache off, a distinct random prompt each repetition, one warm-up request of the
pp shape first. Each test reports the mean and sample standard deviation of the repetitions'
tok/s, as llama-bench's avg_ts and stddev_ts. llama.cpp's own numbers come from
`peers.run_llama_bench` on the same GGUF.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ponder.bench.offline import drive_engine
from ponder.bench.report import format_table
from ponder.bench.workloads import Workload, random_tokens
from ponder.engine.engine import LLMEngine

# Keys of the engine's stats() that say how it computes (added with the quantized path; may be absent).
ENGINE_KEYS = ("weights", "weight_bytes", "kernel", "kv_cache_dtype")


def label(n_prompt: int, n_gen: int) -> str:
    """llama-bench's names: pp512, tg128 (pp512+tg128 for a combined test)."""
    if n_gen == 0:
        return f"pp{n_prompt}"
    if n_prompt == 0:
        return f"tg{n_gen}"
    return f"pp{n_prompt}+tg{n_gen}"


@dataclass
class StreamResult:
    """One test (ppN or tgM) of one engine: tok/s of each repetition, their mean and sample std."""

    name: str                     # engine: ponder, llama.cpp
    n_prompt: int
    n_gen: int
    samples_ts: list[float]
    avg_ts: float
    stddev_ts: float

    @classmethod
    def from_samples(cls, name: str, n_prompt: int, n_gen: int, samples_ts: list[float]) -> "StreamResult":
        std = statistics.stdev(samples_ts) if len(samples_ts) > 1 else 0.0
        return cls(name, n_prompt, n_gen, list(samples_ts), statistics.fmean(samples_ts), std)

    @property
    def test(self) -> str:
        return label(self.n_prompt, self.n_gen)

    def to_dict(self) -> dict:
        return {"name": self.name, "test": self.test, "n_prompt": self.n_prompt, "n_gen": self.n_gen,
                "avg_ts": self.avg_ts, "stddev_ts": self.stddev_ts, "samples_ts": self.samples_ts}


def _one_request(engine: LLMEngine, prompt: list[int], max_tokens: int):
    (record,), _ = drive_engine(engine, Workload("single-stream", [prompt], max_tokens), progress=False)
    if record.error is not None or record.output_tokens != max_tokens:
        raise RuntimeError(f"ponder produced {record.output_tokens} of {max_tokens} tokens: {record.error}")
    return record


def measure_ponder(engine: LLMEngine, pp: int, tg: int, repetitions: int, seed: int = 0) -> list[StreamResult]:
    """pp and tg tests on an engine with nothing else queued (a test of 0 tokens is skipped)."""
    if engine.has_unfinished_requests():
        raise RuntimeError("single-stream needs an idle engine: batch 1 means nothing else is running")
    vocab = engine.vocab_size
    warm = random_tokens(1, max(pp, 1), max(pp, 1), 2, vocab, seed + 10_000).prompts[0]
    _one_request(engine, warm, 2)
    results = []
    if pp:
        prompts = random_tokens(repetitions, pp, pp, 1, vocab, seed).prompts
        samples = [pp / _one_request(engine, prompt, 1).ttft for prompt in prompts]
        results.append(StreamResult.from_samples("ponder", pp, 0, samples))
    if tg:
        samples = []
        for prompt in random_tokens(repetitions, 1, 1, tg, vocab, seed + 1).prompts:
            record = _one_request(engine, prompt, tg)
            samples.append(tg / (record.chunk_times[-1] - record.start))
        results.append(StreamResult.from_samples("ponder", 0, tg, samples))
    return results


def engine_info(stats: dict) -> dict:
    """How the engine computes, from its stats(): weights format and bytes, kernel, KV-cache dtype."""
    return {key: stats.get(key) for key in ENGINE_KEYS}


def describe(info: dict) -> str:
    """engine_info as one line: 'weights native (84.0 MB), kernel vnni, kv_cache_dtype fp16'."""
    parts = []
    for key, value in info.items():
        if value is None or key == "weight_bytes":
            continue
        if key == "weights" and info.get("weight_bytes"):
            value = f"{value} ({info['weight_bytes'] / 1e6:.1f} MB)"
        parts.append(f"{key} {value}")
    return ", ".join(parts) or "no engine info"


def parse_llama_bench(rows: list[dict]) -> list[StreamResult]:
    """llama-bench's `-o json` rows: n_prompt / n_gen tell pp from tg; its own avg_ts and stddev_ts
    (samples_ts is printed rounded, so the mean is not recomputed from it)."""
    return [StreamResult("llama.cpp", int(row["n_prompt"]), int(row["n_gen"]),
                         [float(v) for v in row.get("samples_ts") or []],
                         float(row["avg_ts"]), float(row["stddev_ts"])) for row in rows]


def llama_bench_info(rows: list[dict]) -> dict:
    """What llama-bench says about its build and run (same in every row), without the samples."""
    keep = ("build_commit", "build_number", "cpu_info", "backends", "model_type", "model_size",
            "model_n_params", "n_threads", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn")
    return {k: rows[0][k] for k in keep if rows and k in rows[0]}


def _cell(result: StreamResult | None) -> str:
    return "-" if result is None else f"{result.avg_ts:.2f} ± {result.stddev_ts:.2f}"


def comparison(results: list[StreamResult], baseline: str = "ponder") -> list[dict]:
    """One row per test: each engine's mean and std tok/s and each peer's ratio to ponder."""
    rows: dict[str, dict] = {}
    for r in results:
        row = rows.setdefault(r.test, {"test": r.test})
        row[r.name] = {"avg_ts": r.avg_ts, "stddev_ts": r.stddev_ts}
    for row in rows.values():
        base = row.get(baseline)
        for name, value in list(row.items()):
            if name not in ("test", baseline) and isinstance(value, dict) and base and base["avg_ts"]:
                row[f"{name}/{baseline}"] = value["avg_ts"] / base["avg_ts"]
    return list(rows.values())


def table(results: list[StreamResult], baseline: str = "ponder") -> str:
    """test | ponder tok/s | peer tok/s | peer/ponder, like llama-bench's mean ± std."""
    names = list(dict.fromkeys(r.name for r in results))
    peers = [n for n in names if n != baseline]
    header = ["test"] + [f"{n} tok/s" for n in names] + [f"{p}/{baseline}" for p in peers]
    by_key = {(r.test, r.name): r for r in results}
    lines = [header]
    for row in comparison(results, baseline):
        ratios = [row.get(f"{p}/{baseline}") for p in peers]
        lines.append([row["test"]] + [_cell(by_key.get((row["test"], n))) for n in names]
                     + ["-" if x is None else f"{x:.2f}x" for x in ratios])
    return format_table(lines)
