"""AsyncEngine on its own (tiny model): streams, aborts, admission, shutdown, failure, idling."""

from __future__ import annotations

import asyncio
import os

import pytest

from ponder import SamplingParams
from ponder.engine.async_engine import AsyncEngine, StepReport
from ponder.engine.streams import EngineDeadError, EngineUnavailable, RequestAborted
from ponder.llm import LLM
from tests.server.conftest import make_tiny_engine

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture
def tiny(byte_tokenizer_dir):
    def make(**options):
        return make_tiny_engine(byte_tokenizer_dir, **options)
    return make


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _final(stream):
    return await stream.final()


def test_streams_match_offline_and_batch(tiny):
    engine = tiny()
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8] * 9]
    reports: list[StepReport] = []

    async def main():
        ae = AsyncEngine(engine, on_step=reports.append)
        ae.start()
        streams = [await ae.add([p], GREEDY, f"r{i}") for i, p in enumerate(prompts)]
        finals = await asyncio.gather(*(_final(s) for s in streams))
        await ae.shutdown()
        return [f[0].outputs[0].token_ids for f in finals]

    served = run(main())
    engine.pool.check_empty()
    offline = [o.outputs[0].token_ids for o in LLM.from_engine(tiny()).generate(prompts, GREEDY)]
    assert served == offline
    assert max(r.num_sampled for r in reports) == 3
    assert sum(len(r.ttfts) for r in reports) == 3 and sum(len(r.finished) for r in reports) == 3


def test_group_with_a_bad_prompt_queues_nothing(tiny):
    engine = tiny(max_model_len=32)

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        with pytest.raises(ValueError, match="context"):
            await ae.add([[1, 2], [3] * 40], GREEDY, "g")
        assert ae.num_in_flight == 0 and not engine.requests
        outs = await _final(await ae.add([[1, 2], [3, 4]], SamplingParams(max_tokens=3, n=2), "ok"))
        await ae.shutdown()
        return outs

    outs = run(main())
    assert [len(o.outputs) for o in outs] == [2, 2]
    engine.pool.check_empty()


def test_abort_frees_blocks_and_shutdown_aborts_the_rest(tiny):
    engine = tiny(max_model_len=512)
    long = SamplingParams(max_tokens=400, ignore_eos=True)

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        a, b = await ae.add([[1] * 30], long, "a"), await ae.add([[2] * 30], long, "b")
        updates = a.updates()
        await updates.__anext__()
        ae.abort(a.request_ids)
        with pytest.raises(RequestAborted):
            async for _ in updates:
                pass
        while ae.stats["requests_in_flight"] != 1:
            await asyncio.sleep(0.01)
        await ae.shutdown()
        with pytest.raises(RequestAborted, match="shutting down"):
            await _final(b)
        with pytest.raises(EngineUnavailable):
            await ae.add([[1]], GREEDY, "late")

    run(main())
    engine.pool.check_empty()


def test_admission_is_bounded(tiny):
    engine = tiny(max_num_seqs=2, max_model_len=512)
    long = SamplingParams(max_tokens=400, ignore_eos=True)

    async def main():
        ae = AsyncEngine(engine, max_waiting_requests=1)
        ae.start()
        await ae.add([[1], [2]], long, "running")          # fills both slots
        await ae.add([[3]], long, "waiting")
        with pytest.raises(EngineUnavailable) as refused:
            await ae.add([[4]], long, "refused")
        assert refused.value.retry_after == 1
        await ae.shutdown()

    run(main())
    engine.pool.check_empty()


def test_engine_failure_fails_requests_and_stays_down(tiny):
    engine = tiny()

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        stream = await ae.add([[1, 2]], SamplingParams(max_tokens=100, ignore_eos=True), "doomed")

        def broken_step():
            raise RuntimeError("kaboom")
        engine.step = broken_step
        with pytest.raises(EngineDeadError, match="kaboom"):
            await _final(stream)
        assert not ae.healthy
        with pytest.raises(EngineDeadError):
            await ae.add([[1]], GREEDY, "after")
        await ae.shutdown()

    run(main())


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads thread CPU time from /proc")
def test_idle_engine_thread_blocks(tiny):
    engine = tiny()

    def cpu_ticks(tid: int) -> int:
        fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])          # utime + stime

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        await _final(await ae.add([[1, 2]], GREEDY, "warm"))
        tid = ae._thread.native_id
        before = cpu_ticks(tid)
        await asyncio.sleep(1.0)
        used = cpu_ticks(tid) - before
        await ae.shutdown()
        return used

    assert run(main()) <= 2          # clock ticks (10 ms each) in a second of idling
