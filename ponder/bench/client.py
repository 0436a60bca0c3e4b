"""An async OpenAI-compatible streaming client that times every request the same way for every server.

Requests go to `POST {base}/v1/completions` with the prompt as token ids, greedy, `ignore_eos`, and
`stream: true`; each SSE chunk that carries a choice is timestamped (TTFT is the first, ITLs are the
gaps). Arrivals are fixed concurrency (rate = inf) or Poisson at a rate, capped by the concurrency.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass

import httpx
from tqdm.auto import tqdm

from ponder.bench.metrics import RequestRecord
from ponder.bench.prometheus import Scrape, parse_prometheus
from ponder.bench.workloads import Workload


def server_root(base_url: str) -> str:
    """'http://h:p/v1/' -> 'http://h:p' (paths are added here, so either form works)."""
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


def arrival_offsets(num_requests: int, rate: float, seed: int = 0) -> list[float]:
    """Seconds after the start at which each request arrives: all at 0 for rate=inf, otherwise a
    Poisson process (exponential gaps with mean 1/rate)."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num_requests):
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass
class Target:
    """An OpenAI-compatible endpoint to measure."""

    name: str
    base_url: str
    model: str | None = None        # sent as "model"; discovered from /v1/models when None

    @property
    def root(self) -> str:
        return server_root(self.base_url)


def discover_model(root: str) -> str:
    try:
        data = httpx.get(f"{root}/v1/models", timeout=10).json()
        return data["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return "default"


def scrape_metrics(root: str) -> Scrape | None:
    """The server's Prometheus metrics, or None if it exposes none."""
    try:
        r = httpx.get(f"{root}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if r.status_code != 200 or "json" in r.headers.get("content-type", ""):
        return None
    scrape = parse_prometheus(r.text)
    return scrape if scrape.values else None


def completion_payload(model: str, prompt: list[int], max_tokens: int, ignore_eos: bool) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}}


async def stream_completion(client: httpx.AsyncClient, url: str, payload: dict) -> RequestRecord:
    """Send one streaming completion and time its chunks."""
    record = RequestRecord(prompt_tokens=len(payload["prompt"]), start=time.perf_counter())
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {body[:300]}"
                return record
            async for line in response.aiter_lines():
                data = line[5:].strip() if line.startswith("data:") else ""
                if not data or data == "[DONE]":
                    continue
                event = json.loads(data)
                now = time.perf_counter()
                if "error" in event:
                    record.error = str(event["error"])[:300]
                    return record
                if _is_token_chunk(event):
                    record.chunk_times.append(now)
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return record
    record.end = time.perf_counter()
    record.output_tokens = usage_tokens if usage_tokens is not None else len(record.chunk_times)
    return record


def _is_token_chunk(event: dict) -> bool:
    """A chunk that carries generated text. A pure end marker (no text, a finish_reason) is not."""
    choices = event.get("choices") or []
    if not choices:
        return False
    choice = choices[0]
    return bool(choice.get("text")) or choice.get("finish_reason") is None


async def _run(target: Target, workload: Workload, concurrency: int, rate: float, seed: int,
               progress: bool, transport: httpx.AsyncBaseTransport | None) -> tuple[list[RequestRecord], float]:
    url = f"{target.root}/v1/completions"
    model = target.model or discover_model(target.root)
    offsets = arrival_offsets(len(workload.prompts), rate, seed)
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(workload.prompts), desc=f"{target.name} c={concurrency}", unit="req",
               disable=not progress, leave=False)
    # A fresh connection per request: llama-server closes idle keep-alive connections, and a request
    # sent on one it just closed fails with "Server disconnected" (a loopback connect costs ~0.1 ms).
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits,
                                 transport=transport) as client:
        t0 = time.perf_counter()

        async def one(prompt: list[int], offset: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            async with gate:
                record = await stream_completion(
                    client, url, completion_payload(model, prompt, workload.output_len, workload.ignore_eos))
            bar.update(1)
            return record

        records = await asyncio.gather(*(one(p, o) for p, o in zip(workload.prompts, offsets)))
        duration = time.perf_counter() - t0
    bar.close()
    return list(records), duration


def run_workload(target: Target, workload: Workload, concurrency: int, rate: float = math.inf,
                 seed: int = 0, progress: bool = True,
                 transport: httpx.AsyncBaseTransport | None = None) -> tuple[list[RequestRecord], float]:
    """Send the workload to the target; returns per-request records and the wall time of the run.
    (`transport` replaces the network, for tests.)"""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    return asyncio.run(_run(target, workload, concurrency, rate, seed, progress, transport))
