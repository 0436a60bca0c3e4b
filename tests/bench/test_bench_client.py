"""The HTTP client: arrival patterns, SSE chunk timing, errors, and the concurrency gate.

The network is replaced by an httpx transport that answers like an OpenAI-compatible server; the
real servers are exercised by the `bench serve` runs in test_bench_commands.py.
"""

import asyncio
import json
import math
import statistics

import httpx
import pytest

from ponder.bench.client import (Target, arrival_offsets, completion_payload, run_workload, server_root,
                                 stream_completion)
from ponder.bench.workloads import Workload


def sse(*events) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def chunk(text, finish=None, usage=None):
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": usage}


def test_arrival_offsets():
    assert arrival_offsets(4, math.inf) == [0.0] * 4
    offsets = arrival_offsets(2000, rate=50.0, seed=3)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert statistics.mean(b - a for a, b in zip(offsets, offsets[1:])) == pytest.approx(1 / 50, rel=0.1)
    assert arrival_offsets(10, 5.0, seed=3) == arrival_offsets(10, 5.0, seed=3)
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)


def test_server_root_accepts_either_form():
    assert server_root("http://h:1/v1/") == "http://h:1"
    assert server_root("http://h:1") == "http://h:1"
    assert Target("x", "http://h:1/v1").root == "http://h:1"


def _stream(handler, payload):
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await stream_completion(client, "http://test/v1/completions", payload)
    return asyncio.run(go())


def test_stream_times_token_chunks_and_reads_usage():
    body = sse(chunk("He"), chunk(""), chunk("llo"), chunk("", finish="length"),
               {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}, "[DONE]")
    seen = {}

    def handler(request):
        seen.update(json.loads(request.content))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    record = _stream(handler, completion_payload("m", [5, 6, 7], 4, ignore_eos=True))
    assert seen["prompt"] == [5, 6, 7] and seen["stream"] and seen["ignore_eos"] and seen["temperature"] == 0
    assert record.ok and record.prompt_tokens == 3
    assert len(record.chunk_times) == 3          # the empty middle chunk counts, the end marker does not
    assert record.output_tokens == 4             # from usage
    assert record.start <= record.chunk_times[0] <= record.end


def test_stream_without_usage_counts_chunks():
    record = _stream(lambda r: httpx.Response(200, content=sse(chunk("a"), chunk("b", finish="length"), "[DONE]")),
                     completion_payload("m", [1], 2, True))
    assert record.output_tokens == 2 and record.ok


def test_stream_errors_are_recorded_not_raised():
    r500 = _stream(lambda r: httpx.Response(500, content=b"boom"), completion_payload("m", [1], 2, True))
    assert not r500.ok and "HTTP 500" in r500.error and "boom" in r500.error
    mid = _stream(lambda r: httpx.Response(200, content=sse(chunk("a"), {"error": {"message": "aborted"}})),
                  completion_payload("m", [1], 2, True))
    assert not mid.ok and "aborted" in mid.error

    def refuse(request):
        raise httpx.ConnectError("refused")

    down = _stream(refuse, completion_payload("m", [1], 2, True))
    assert not down.ok and "ConnectError" in down.error


def test_run_workload_never_exceeds_the_concurrency():
    state = {"now": 0, "most": 0}

    async def handler(request):
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        n = json.loads(request.content)["max_tokens"]
        return httpx.Response(200, content=sse(*[chunk("x") for _ in range(n)], "[DONE]"))

    workload = Workload("w", [[1, 2]] * 9, output_len=3)
    records, duration = run_workload(Target("t", "http://test", model="m"), workload, concurrency=3,
                                     progress=False, transport=httpx.MockTransport(handler))
    assert len(records) == 9 and all(r.ok and r.output_tokens == 3 for r in records)
    assert state["most"] == 3 and duration > 0
