"""Offline throughput runs: every request queued at t0, measured to the last token.

ponder runs in-process (the engine's own loop, each step timestamped per request); transformers
runs static batches (peers.run_hf_offline); llama.cpp runs as llama-server with one slot per request,
driven at concurrency = number of requests by the same HTTP client as `bench serve`.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from ponder.bench import peers
from ponder.bench.client import Target, run_workload, scrape_metrics
from ponder.bench.metrics import RequestRecord, RunResult, compute_metrics
from ponder.bench.prometheus import engine_counters
from ponder.bench.workloads import Workload, warmup
from ponder.config import EngineConfig
from ponder.engine.engine import LLMEngine
from ponder.model.loader import LoadedModel
from ponder.sampling_params import SamplingParams

_COUNTERS = ("prompt_tokens", "prompt_tokens_cached", "generation_tokens", "preemptions", "steps")


def engine_run_counters(before: dict, after: dict) -> dict:
    """The engine's counters over a run (from two `LLMEngine.stats()` snapshots)."""
    delta = {k: after[k] - before[k] for k in _COUNTERS}
    seen = delta["prompt_tokens"] + delta["prompt_tokens_cached"]
    delta["prefix_cache_hit_rate"] = delta["prompt_tokens_cached"] / seen if seen else 0.0
    delta["max_batch_seqs"] = after["max_batch_seqs"]
    return delta


def drive_engine(engine: LLMEngine, workload: Workload,
                 progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Queue the whole workload, step the engine until done, timestamp each request's new tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=workload.output_len, ignore_eos=workload.ignore_eos)
    t0 = time.perf_counter()
    records: dict[str, RequestRecord] = {}
    for prompt in workload.prompts:
        request = engine.add_request(None, params, prompt_token_ids=prompt)
        records[request.request_id] = RequestRecord(len(prompt), start=t0)
    bar = tqdm(total=len(records), desc="ponder", unit="req", disable=not progress, leave=False)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            record = records[out.request_id]
            produced = len(out.outputs[0].token_ids)
            if produced > record.output_tokens:
                record.output_tokens = produced
                record.chunk_times.append(now)
            if out.finished:
                record.end, record.error = now, out.error
                bar.update(1)
    bar.close()
    return list(records.values()), time.perf_counter() - t0


def run_ponder(workload: Workload, loaded: LoadedModel, engine_options: dict, progress: bool = True,
               slos: dict | None = None) -> RunResult:
    """ponder in-process on a model already loaded (engines with different options share it)."""
    config = EngineConfig(model=loaded.path, **engine_options)
    engine = LLMEngine(config, loaded=loaded)
    drive_engine(engine, warmup(workload), progress=False)
    engine.pool.reset_prefix_cache()
    before = engine.stats()
    records, duration = drive_engine(engine, workload, progress)
    counters = engine_run_counters(before, engine.stats())
    return RunResult("ponder", "offline", min(len(workload.prompts), config.max_num_seqs), workload.describe(),
                     records, duration, compute_metrics(records, duration, slos),
                     engine_counters=counters, config=engine_options)


def run_hf(workload: Workload, model_path: str, cache_dir: str, progress: bool = True,
           slos: dict | None = None) -> RunResult:
    records, duration = peers.run_hf_offline(workload, model_path, cache_dir, progress=progress)
    return RunResult("hf", "offline", min(len(workload.prompts), peers.HF_BATCH_SIZE), workload.describe(),
                     records, duration, compute_metrics(records, duration, slos),
                     config={"batch_size": peers.HF_BATCH_SIZE, "dtype": "float32", "padding": "left"})


def run_llamacpp(workload: Workload, gguf_path: str, progress: bool = True,
                 slos: dict | None = None) -> RunResult:
    slots = len(workload.prompts)
    slot_ctx = peers.slot_context(workload)
    with peers.llama_server(gguf_path, slots, slot_ctx) as server:
        target = Target("llama.cpp", server.base_url)
        run_workload(target, warmup(workload), 1, progress=False)
        before = scrape_metrics(target.root)
        records, duration = run_workload(target, workload, slots, progress=progress)
        counters = engine_counters(before, scrape_metrics(target.root))
    return RunResult("llama.cpp", "offline", slots, workload.describe(), records, duration,
                     compute_metrics(records, duration, slos), engine_counters=counters,
                     config={"threads": peers.LLAMA_THREADS, "parallel": slots, "ctx": slots * slot_ctx,
                             "cache_ram": 0})
