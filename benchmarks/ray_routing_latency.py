"""What routing over Ray replicas adds to a request's latency: a 1-token request through the
ReplicaSet front end (router, the hop to the replica, its engine, the batch of outputs back) against
the same request on one in-process AsyncEngine, and the time per streamed token on both paths; over
each data plane (channel.py): the socket (the default) and Ray's actor calls and streaming generator.

Both paths serve the same model with the same threads (one replica of `--replica-cpus` CPUs, the
local engine with as many threads); requests alternate between them one at a time, so neither path
runs while the other is measured (an idle engine blocks on its queue). Run it on an idle machine:
timings on a shared one say little. Prints JSON (and writes it to `--output`).

    PYTHONPATH=. .venv/bin/python benchmarks/ray_routing_latency.py --requests 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

from ponder.distributed.cluster import RayCluster


def percentiles(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)

    def at(q: float) -> float:
        return ms[min(len(ms) - 1, int(q * len(ms)))]

    return {"p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "mean_ms": statistics.fmean(ms), "n": len(ms)}


async def one_request(engine, prompt: list[int], params) -> float:
    """Seconds from submitting a request to its final output."""
    start = time.perf_counter()
    stream = await engine.add([prompt], params, f"bench-{uuid.uuid4().hex}")
    await stream.final()
    return time.perf_counter() - start


async def streamed(engine, prompt: list[int], params) -> tuple[float, int]:
    """Seconds from the first token to the last, and the tokens in between, as the reader sees them."""
    stream = await engine.add([prompt], params, f"bench-{uuid.uuid4().hex}")
    first = last = None
    tokens = 0
    async for update in stream.updates():
        out = update.outputs[0]
        if out is not None and out.outputs[0].token_ids:
            now = time.perf_counter()
            if first is None:
                first, first_tokens = now, len(out.outputs[0].token_ids)
            last, tokens = now, len(out.outputs[0].token_ids)
    return last - first, tokens - first_tokens


async def measure(local, replica_sets: dict, prompt: list[int], args) -> dict:
    from ponder import SamplingParams

    one_token = SamplingParams(temperature=0, max_tokens=1)
    many = SamplingParams(temperature=0, max_tokens=args.stream_tokens, ignore_eos=True)
    paths = {"one_engine": local, **{f"replicas_{channel}": r for channel, r in replica_sets.items()}}
    for _ in range(args.warmup):
        for engine in paths.values():
            await one_request(engine, prompt, one_token)
    latency = {name: [] for name in paths}
    for _ in range(args.requests):
        for name, engine in paths.items():
            latency[name].append(await one_request(engine, prompt, one_token))
    per_token = {name: [] for name in paths}
    for _ in range(args.stream_requests):
        for name, engine in paths.items():
            seconds, tokens = await streamed(engine, prompt, many)
            per_token[name].append(seconds / max(tokens, 1))
    result = {name: {"one_token_request": percentiles(latency[name]),
                     "per_streamed_token": percentiles(per_token[name])} for name in paths}
    result["added_by_routing"] = {channel: {
        "one_token_request_p50_ms": result[f"replicas_{channel}"]["one_token_request"]["p50_ms"]
        - result["one_engine"]["one_token_request"]["p50_ms"],
        "per_streamed_token_p50_ms": result[f"replicas_{channel}"]["per_streamed_token"]["p50_ms"]
        - result["one_engine"]["per_streamed_token"]["p50_ms"]} for channel in replica_sets}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="1-token requests per path")
    parser.add_argument("--stream-requests", type=int, default=10, help="streamed requests per path")
    parser.add_argument("--stream-tokens", type=int, default=128, help="tokens per streamed request")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--model", default=None, help="default: the packaged default model")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--replica-cpus", type=int, default=1)
    parser.add_argument("--channel", action="append", choices=["socket", "ray"], default=None,
                        help="the replicas' data plane, one replica set each (default: both)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()

    channels = args.channel or ["socket", "ray"]
    with RayCluster(num_cpus=max(2, args.replica_cpus * len(channels))):
        from ponder.config import EngineConfig
        from ponder.distributed.frontend import ReplicaSet
        from ponder.distributed.replica import ReplicaSpec
        from ponder.engine.async_engine import AsyncEngine
        from ponder.engine.engine import LLMEngine
        from ponder.engine.engine_thread import EngineThread

        config = EngineConfig(model=args.model, num_threads=args.replica_cpus, num_kv_blocks=256)
        replica_sets = {channel: ReplicaSet(ReplicaSpec(config, num_cpus=args.replica_cpus, channel=channel), 1)
                        for channel in channels}
        engine_thread = EngineThread()
        engine = engine_thread.call(lambda: LLMEngine(config))
        prompt = engine.tokenizer.encode(args.prompt)

        async def run() -> dict:
            local = AsyncEngine(engine, engine_thread=engine_thread)
            local.start()
            for replicas in replica_sets.values():
                replicas.start()
            try:
                return await measure(local, replica_sets, prompt, args)
            finally:
                await local.shutdown()
                for replicas in replica_sets.values():
                    await replicas.shutdown()

        result = asyncio.run(run())
    result["config"] = {"model": config.model or "smollm2-135m-instruct", "prompt_tokens": len(prompt),
                        "replica_cpus": args.replica_cpus, "requests": args.requests,
                        "stream_requests": args.stream_requests, "stream_tokens": args.stream_tokens}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
