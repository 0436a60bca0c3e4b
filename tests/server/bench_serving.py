"""Server vs offline on the same machine, in one run (not a test; a few minutes on 2 cores):

    .venv/bin/python -m tests.server.bench_serving [--concurrency 16] [--requests 64]

1. offline: `LLM.generate` on `offline_64` (64 random-token prompts of 64-256 tokens, 128 out,
   ignore_eos), with all 64 at once and with at most `--concurrency` at once; and the engine's own
   prefill step for a lone 64-token prompt;
2. `ponder serve` in a subprocess, and an async streaming client here: the same workload at fixed
   concurrency, then lone 64-token prompts one at a time: time to first token, against the server
   engine's own step time for the same request (from /metrics), which the machine's load moves alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from ponder import LLM, SamplingParams
from ponder.bench.workloads import offline_64


def offline(llm: LLM, workload, max_num_seqs: int) -> dict:
    """Output tokens per second of LLM.generate on the workload, at most `max_num_seqs` at a time."""
    engine = llm.engine
    engine.pool.reset_prefix_cache()
    engine.scheduler.max_num_seqs = max_num_seqs
    params = SamplingParams(temperature=0, max_tokens=workload.output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(workload.prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tok_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens}


def prefill_step_ms(llm: LLM, prompts: list[list[int]]) -> float:
    """p50 of the engine's own step that prefills a lone prompt and samples its first token."""
    engine, times = llm.engine, []
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


async def _stream(http: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """(seconds to the first token chunk, tokens) of one streamed greedy completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start, ttft, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and ttft is None:
                ttft = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return ttft, tokens


async def client(url: str, workload, lone_prompts, concurrency: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await _stream(http, workload.prompts[0][:16], 4)                      # warm up
        queue = list(workload.prompts)
        totals = []

        async def worker():
            while queue:
                totals.append((await _stream(http, queue.pop(), workload.output_len))[1])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        ttfts, steps = [], []
        for prompt in lone_prompts:          # one token each: exactly one engine step, the prefill
            before = await _step_seconds(http)
            ttfts.append((await _stream(http, prompt, 1))[0])
            steps.append(await _step_seconds(http) - before)
    return {"tok_s": sum(totals) / elapsed, "seconds": elapsed, "tokens": sum(totals),
            "lone_ttft_p50_ms": 1000 * statistics.median(ttfts), "lone_step_p50_ms": 1000 * statistics.median(steps),
            "overhead_p50_ms": 1000 * statistics.median(t - s for t, s in zip(ttfts, steps))}


async def _step_seconds(http: httpx.AsyncClient) -> float:
    """Seconds the server's engine has spent in steps so far (from /metrics)."""
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith("ponder:engine_step_seconds_sum"):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError("no ponder:engine_step_seconds_sum in /metrics")


def on_thread(fn, main_thread: bool, *args):
    """fn(*args) on this thread, or on a worker thread as the server's engine runs: on a busy
    2-core machine torch's matmuls measured many times slower on the main thread than on another."""
    if main_thread:
        return fn(*args)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def serve(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "ponder.cli", "serve", "--port", str(port),
                             "--num-kv-blocks", "2048", "--log-level", "warning"])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--lone", type=int, default=10, help="lone 64-token prompts for TTFT")
    parser.add_argument("--main-thread", action="store_true",
                        help="run the offline engine on the main thread (default: a worker thread, as the server does)")
    args = parser.parse_args()
    llm = LLM(num_kv_blocks=2048)
    workload = offline_64(llm.engine.vocab_size)
    workload.prompts = workload.prompts[:args.requests]
    rng = random.Random(1)
    lone = [[rng.randrange(100, 32000) for _ in range(64)] for _ in range(args.lone)]
    llm.generate(workload.prompts[:4], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)   # warm up
    runs = {n: on_thread(offline, args.main_thread, llm, workload, n) for n in (64, args.concurrency)}
    for n, run in runs.items():
        print(f"offline, max_num_seqs {n}: {run['tokens']} tokens in {run['seconds']:.1f}s = "
              f"{run['tok_s']:.1f} out tok/s", flush=True)
    print(f"offline: lone 64-token prefill step p50 {on_thread(prefill_step_ms, args.main_thread, llm, lone):.1f} ms",
          flush=True)
    del llm
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = serve(port)
    try:
        lone = [[t + 1 for t in p] for p in lone]       # no prefix-cache hits from the offline run
        srv = asyncio.run(client(f"http://127.0.0.1:{port}", workload, lone, args.concurrency))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    ratios = ", ".join(f"{100 * srv['tok_s'] / run['tok_s']:.0f}% of offline at max_num_seqs {n}"
                       for n, run in runs.items())
    print(f"server, concurrency {args.concurrency}: {srv['tokens']} tokens in {srv['seconds']:.1f}s = "
          f"{srv['tok_s']:.1f} out tok/s ({ratios})")
    print(f"server: lone 64-token TTFT p50 {srv['lone_ttft_p50_ms']:.1f} ms; its engine's prefill step p50 "
          f"{srv['lone_step_p50_ms']:.1f} ms; TTFT minus prefill step p50 {srv['overhead_p50_ms']:.1f} ms")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
