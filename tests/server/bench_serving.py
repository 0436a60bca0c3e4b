"""Server vs offline on the same machine, in one run (not a test; a few minutes on 2 cores):

    .venv/bin/python -m tests.server.bench_serving [--concurrency 16] [--requests 64]

1. offline: `LLM.generate` on `offline_64` (64 random-token prompts of 64-256 tokens, 128 out,
   ignore_eos), and the engine's own prefill time for a lone 64-token prompt (one step);
2. `ponder serve` in a subprocess, and an async streaming client here: the same workload at fixed
   concurrency, then lone 64-token prompts one at a time for time to first token.
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

import httpx

from ponder import LLM, SamplingParams
from ponder.bench.workloads import offline_64


def offline(llm: LLM, workload, lone_prompts) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=workload.output_len, ignore_eos=True)
    llm.generate(workload.prompts[:4], SamplingParams(temperature=0, max_tokens=4))     # warm up
    start = time.perf_counter()
    outs = llm.generate(workload.prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prefill = []
    for prompt in lone_prompts:
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
        t = time.perf_counter()
        engine.step()                      # prefill of the 64 tokens and the first sample
        prefill.append(time.perf_counter() - t)
        while engine.has_unfinished_requests():
            engine.step()
    return {"tok_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens,
            "prefill_p50_ms": 1000 * statistics.median(prefill)}


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
        ttfts = [(await _stream(http, p, 2))[0] for p in lone_prompts]
    return {"tok_s": sum(totals) / elapsed, "seconds": elapsed, "tokens": sum(totals),
            "lone_ttft_p50_ms": 1000 * statistics.median(ttfts)}


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
    args = parser.parse_args()
    llm = LLM(num_kv_blocks=2048)
    workload = offline_64(llm.engine.vocab_size)
    workload.prompts = workload.prompts[:args.requests]
    rng = random.Random(1)
    lone = [[rng.randrange(100, 32000) for _ in range(64)] for _ in range(args.lone)]
    off = offline(llm, workload, lone)
    del llm
    print(f"offline: {off['tokens']} tokens in {off['seconds']:.1f}s = {off['tok_s']:.1f} out tok/s; "
          f"lone 64-token prefill step p50 {off['prefill_p50_ms']:.1f} ms", flush=True)
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
    print(f"server (concurrency {args.concurrency}): {srv['tokens']} tokens in {srv['seconds']:.1f}s = "
          f"{srv['tok_s']:.1f} out tok/s ({100 * srv['tok_s'] / off['tok_s']:.0f}% of offline); "
          f"lone 64-token TTFT p50 {srv['lone_ttft_p50_ms']:.1f} ms "
          f"(+{srv['lone_ttft_p50_ms'] - off['prefill_p50_ms']:.1f} ms over the engine's prefill step)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
