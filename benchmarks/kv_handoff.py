"""KV hand-off cost of prefill/decode disaggregation (engine/handoff.py) on one model: for a few
prompt lengths, the time to first token on a prefill engine, then each part of moving the prompt's
KV to a decode engine — export (gather the KV, free the blocks), serialize as Ray's object store
does numpy (pickle protocol 5, the array's buffer out of band and copied once into the store),
deserialize (zero-copy), import (allocate blocks, scatter the KV, register them) — and the decode
engine's first step after it. Prints JSON: per length the medians over `--repeats` fresh prompts
(after one unrecorded run), the hand-off's GB/s and its size relative to TTFT.

The first token is sampled on the prefill engine, so the hand-off delays the second token, not the
first: `handoff_over_ttft` is what it adds relative to TTFT (what it would cost TTFT if the decode
engine sampled the first token). Ray's real object store measured 3-4 GB/s here (shared/RAY.md);
the serialize step here is one memcpy, so it is a lower bound on Ray's.

    .venv/bin/python benchmarks/kv_handoff.py --lengths 128 512 2048 \\
        --output benchmarks/results/kv-handoff.json

`--ray` measures the real thing instead: one prefill and one decode replica (distributed/pd_replica.py)
as Ray actors on a local loopback cluster (distributed/cluster.py's RayCluster), behind the P/D front
end, each request streamed from the front end. Per hand-off the replicas time export (engine
thread), `ray.put` into the object store, the decode replica's fetch (`await ref`) and import (until
its engine took the request); the front end times TTFT (first token, from the prefill replica) and
the gap to the second token (the decode replica's first step after the hand-off). `handoff_gb_per_s`
is KV bytes over export + put + fetch + import; `handoff_over_ttft` its share of TTFT.

    .venv/bin/python benchmarks/kv_handoff.py --ray --lengths 128 512 2048 \\
        --output benchmarks/results/kv-handoff-ray.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import random
import statistics
import time

from ponder import SamplingParams
from ponder.config import EngineConfig
from ponder.engine.engine import LLMEngine
from ponder.engine.handoff import Handoff

FIRST_TOKEN = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def prefill(engine: LLMEngine, prompt: list[int], request_id: str) -> None:
    engine.add_request(prompt, FIRST_TOKEN, request_id, prefill_only=True)
    while request_id not in engine.held:
        engine.step()


def serialize(handoff: Handoff) -> tuple[bytes, list[bytes]]:
    """What `ray.put` does with it: pickle with the numpy buffer out of band, the buffer copied
    into the store."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(handoff, protocol=5, buffer_callback=buffers.append)
    return data, [bytes(b.raw()) for b in buffers]


def deserialize(payload: tuple[bytes, list[bytes]]) -> Handoff:
    data, buffers = payload
    return pickle.loads(data, buffers=buffers)


def one_handoff(prefill_engine: LLMEngine, decode_engine: LLMEngine, prompt: list[int], request_id: str) -> dict:
    _, ttft = timed(prefill, prefill_engine, prompt, request_id)
    handoff, export_s = timed(prefill_engine.export_handoff, request_id)
    payload, serialize_s = timed(serialize, handoff)
    arrived, deserialize_s = timed(deserialize, payload)
    _, import_s = timed(decode_engine.add_handoff, arrived, request_id)
    _, first_decode_s = timed(decode_engine.step)
    decode_engine.abort_request(request_id)
    total = export_s + serialize_s + deserialize_s + import_s
    return {"ttft_s": ttft, "export_s": export_s, "serialize_s": serialize_s, "deserialize_s": deserialize_s,
            "import_s": import_s, "handoff_s": total, "first_decode_step_s": first_decode_s,
            "kv_bytes": handoff.nbytes}


def summarize(length: int, runs: list[dict]) -> dict:
    row = {"prompt_tokens": length, "repeats": len(runs)}
    row.update({key: statistics.median(r[key] for r in runs) for key in runs[0]})
    row["handoff_gb_per_s"] = row["kv_bytes"] / row["handoff_s"] / 1e9
    for part in ("export", "serialize", "deserialize", "import"):
        row[f"{part}_gb_per_s"] = row["kv_bytes"] / row[f"{part}_s"] / 1e9
    row["handoff_over_ttft"] = row["handoff_s"] / row["ttft_s"]
    return row


async def one_ray_handoff(pd, prompt: list[int], request_id: str) -> dict:
    """One request through the P/D front end: its TTFT and gap to the second token here, its
    hand-off's parts as the replicas timed them."""
    start = time.perf_counter()
    stream = await pd.add([prompt], FIRST_TOKEN, request_id)
    times = []
    async for update in stream.updates():
        if len(update.outputs[0].outputs[0].token_ids) > len(times):
            times.append(time.perf_counter())
        if len(times) >= 2:
            break
    pd.abort(stream.request_ids)
    engine_id = stream.request_ids[0]
    reports = await asyncio.to_thread(pd.kv_reports)
    parts = {k: v for (role, _), report in reports.items() for r in report["recent"] if r["request_id"] == engine_id
             for k, v in r.items() if k != "request_id"}
    handoff = parts["export_s"] + parts["put_s"] + parts["fetch_s"] + parts["import_s"]
    return {"ttft_s": times[0] - start, "second_token_gap_s": times[1] - times[0], "export_s": parts["export_s"],
            "put_s": parts["put_s"], "fetch_s": parts["fetch_s"], "import_s": parts["import_s"], "handoff_s": handoff,
            "kv_bytes": parts["kv_bytes"]}


def summarize_ray(length: int, runs: list[dict]) -> dict:
    row = {"prompt_tokens": length, "repeats": len(runs)}
    row.update({key: statistics.median(r[key] for r in runs) for key in runs[0]})
    row["handoff_gb_per_s"] = row["kv_bytes"] / row["handoff_s"] / 1e9
    row["object_store_gb_per_s"] = row["kv_bytes"] / (row["put_s"] + row["fetch_s"]) / 1e9
    row["handoff_over_ttft"] = row["handoff_s"] / row["ttft_s"]
    return row


def main_ray(args, blocks: int) -> dict:
    """The hand-off between two replicas on a local loopback Ray cluster (2 CPUs: one each)."""
    from ponder.distributed.cluster import RayCluster

    config = EngineConfig(model=args.model, num_kv_blocks=blocks, enable_prefix_caching=False)
    rng = random.Random(0)
    with RayCluster(num_cpus=2):                 # a 256 MB object store: 2048 tokens of SmolLM2-135M is 47 MB
        from ponder.distributed.pd_frontend import DisaggregatedReplicas   # imports ray: after the settings
        from ponder.distributed.replica import ReplicaSpec

        pd = DisaggregatedReplicas(ReplicaSpec(config, max_waiting_requests=None), 1, 1)

        async def run() -> list[dict]:
            pd.start()
            try:
                vocab = pd.info.vocab_size
                rows = []
                for n in args.lengths:       # the first run of each length warms up
                    runs = [await one_ray_handoff(pd, [rng.randrange(vocab) for _ in range(n)], f"{n}-{i}")
                            for i in range(args.repeats + 1)]
                    rows.append(summarize_ray(n, runs[1:]))
                return rows
            finally:
                await pd.shutdown()

        rows = asyncio.run(run())
        return {"model": pd.info.model_name, "transport": "ray object store (local, loopback)",
                "replica_cpus": 1, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: the packaged default model")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ray", action="store_true", help="between two replicas through Ray's object store")
    p.add_argument("--output")
    args = p.parse_args()
    blocks = 2 * (max(args.lengths) + 64) // 16 + 8
    report = main_ray(args, blocks) if args.ray else main_local(args, blocks)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


def main_local(args, blocks: int) -> dict:
    """The hand-off between two engines in this process, the object store's trip simulated."""
    # no prefix cache on the prefill side: every prompt is computed, as a fresh one would be
    prefill_engine = LLMEngine(EngineConfig(model=args.model, num_kv_blocks=blocks, enable_prefix_caching=False))
    decode_engine = LLMEngine(EngineConfig(model=args.model, num_kv_blocks=blocks, enable_prefix_caching=False),
                              loaded=prefill_engine.loaded)
    rng = random.Random(0)
    vocab = prefill_engine.vocab_size

    def prompt(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    rows = []
    for n in args.lengths:     # the first run of each length warms up (shapes the kernels meet first)
        runs = [one_handoff(prefill_engine, decode_engine, prompt(n), f"{n}-{i}") for i in range(args.repeats + 1)]
        rows.append(summarize(n, runs[1:]))
    prefill_engine.pool.check_empty()
    decode_engine.pool.check_empty()
    stats = prefill_engine.stats()
    return {"model": prefill_engine.model_config.name or args.model, "weights": stats["weights"],
            "kv_cache_dtype": stats["kv_cache_dtype"], "threads": prefill_engine.config.num_threads, "rows": rows}


if __name__ == "__main__":
    main()
