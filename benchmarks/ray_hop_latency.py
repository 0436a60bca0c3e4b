"""Ray's own costs on this machine, for reading `ray_routing_latency.py`: an async actor's method
round trip, and the time from a streaming generator's yield to the caller holding the item — the two
hops a routed request takes — on a loopback cluster (ponder's RayCluster). Prints JSON.

    PYTHONPATH=. .venv/bin/python benchmarks/ray_hop_latency.py --calls 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from ponder.distributed.cluster import RayCluster


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    with RayCluster(num_cpus=2):
        import ray

        @ray.remote(num_cpus=1)
        class Echo:
            def __init__(self):
                self.queue = asyncio.Queue()

            async def ping(self, x):
                return x

            async def push(self, t):
                self.queue.put_nowait(t)

            async def stream(self):
                while True:
                    yield await self.queue.get()

        async def measure():
            echo = Echo.remote()
            await echo.ping.remote(0)
            calls = []
            for i in range(args.calls):
                start = time.perf_counter()
                await echo.ping.remote(i)
                calls.append(time.perf_counter() - start)
            stream = echo.stream.remote()
            received = []
            for i in range(args.calls):
                start = time.perf_counter()
                await echo.push.remote(start)       # a call in, then the item back through the stream
                ref = await stream.__anext__()
                await ref
                received.append(time.perf_counter() - start)
            return calls, received

        calls, received = asyncio.run(measure())
    ms = lambda xs: {"p50_ms": round(1000 * statistics.median(xs), 3), "mean_ms": round(1000 * statistics.fmean(xs), 3)}
    print(json.dumps({"actor_call_round_trip": ms(calls), "call_then_streamed_item": ms(received),
                      "calls": args.calls}, indent=1))


if __name__ == "__main__":
    main()
