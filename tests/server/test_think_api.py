"""Think strategies over HTTP: /v1/chat/completions with a "ponder" object, through the official
`openai` client (extra_body) on the default model, and think programs on the AsyncEngine with the
tiny model."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from ponder import SamplingParams
from ponder.engine.async_engine import AsyncEngine
from ponder.engine.streams import EngineDeadError, EngineUnavailable, RequestAborted, RequestFailed
from ponder.engine.programs import STALLED
from ponder.think.run import ThinkPrompt, think_program
from ponder.think.catalog import STRATEGIES
from tests.server.conftest import make_tiny_engine

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is 2 + 3? Give the final answer as a number."}]
SC = {"strategy": "self-consistency", "n": 4}


# -- think programs on the AsyncEngine (tiny model, fast) --------------------------------------------
def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def start_think(ae: AsyncEngine, prompt, options: dict, request_id: str):
    """What the server does for a think request: hand the async engine a think program."""
    return ae.start_program(think_program(prompt, options, request_id), request_id)


def test_async_engine_think_alone_counts_in_flight_and_frees_everything(byte_tokenizer_dir):
    engine = make_tiny_engine(byte_tokenizer_dir)

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        stream = await start_think(ae, [{"role": "user", "content": "hi"}],
                                {"strategy": "self-consistency", "n": 3, "max_tokens": 6}, "t1")
        assert ae.num_in_flight == 1
        events = []
        async for update in stream.updates():
            events += update.events
        assert ae.stats["requests_in_flight"] == 0
        with pytest.raises(ValueError, match="unknown strategy"):
            await start_think(ae, [{"role": "user", "content": "hi"}], {"strategy": "nope"}, "t2")
        assert ae.num_in_flight == 0
        await ae.shutdown()
        return stream.result, events

    result, events = _run(main())
    assert len(result.candidates) == 3 and result.usage["generated_tokens"] == 18
    assert any(e["event"] == "progress" and e["branches_alive"] == 3 for e in events)
    assert not engine.requests
    engine.pool.check_empty()


def test_async_engine_think_takes_a_prompt_the_server_already_rendered(byte_tokenizer_dir, monkeypatch):
    """The server renders the chat template once (to answer 400s and check the context); the engine
    thread must use those ids, not render the messages again."""
    engine = make_tiny_engine(byte_tokenizer_dir)
    messages = [{"role": "user", "content": "hi"}]
    ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                                  add_special_tokens=False)

    def render_again(*args, **kwargs):
        raise AssertionError("the chat template was rendered a second time")

    monkeypatch.setattr(engine.tokenizer, "apply_chat_template", render_again)

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        stream = await start_think(ae, ThinkPrompt.from_messages(messages, ids),
                                {"strategy": "self-consistency", "n": 2, "max_tokens": 4}, "t1")
        async for _ in stream.updates():
            pass
        await ae.shutdown()
        return stream.result

    result = _run(main())
    assert result.error is None and result.num_prompt_tokens == len(ids)
    assert result.usage["generated_tokens"] == 8
    engine.pool.check_empty()


def test_async_engine_think_abort_shutdown_and_death(byte_tokenizer_dir):
    engine = make_tiny_engine(byte_tokenizer_dir, max_model_len=512)
    long = {"strategy": "self-consistency", "n": 4, "max_tokens": 400}

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        # aborted by the client after its first progress event: every branch freed at once
        a = await start_think(ae, [{"role": "user", "content": "a"}], long, "a")
        updates = a.updates()
        await updates.__anext__()
        ae.abort(a.request_ids)
        with pytest.raises(RequestAborted):
            async for _ in updates:
                pass
        while ae.num_in_flight:
            await asyncio.sleep(0.01)
        assert not engine.requests and engine.pool.num_free == engine.pool.num_blocks
        # shut down while running: aborted too
        b = await start_think(ae, [{"role": "user", "content": "b"}], long, "b")
        await b.updates().__anext__()
        await ae.shutdown()
        with pytest.raises(RequestAborted, match="shutting down"):
            await b.final()

    _run(main())
    assert not engine.requests
    engine.pool.check_empty()

    engine = make_tiny_engine(byte_tokenizer_dir, max_model_len=512)

    async def dies():
        ae = AsyncEngine(engine)
        ae.start()
        stream = await start_think(ae, [{"role": "user", "content": "c"}], long, "c")

        def broken_step():
            raise RuntimeError("kaboom")
        engine.step = broken_step
        with pytest.raises(EngineDeadError, match="kaboom"):
            await stream.final()
        await ae.shutdown()

    _run(dies())
    assert not engine.requests      # the run was aborted when the engine died: its request is gone
    engine.pool.check_empty()


def test_async_engine_think_is_bounded_like_a_request(byte_tokenizer_dir):
    engine = make_tiny_engine(byte_tokenizer_dir, max_num_seqs=1, max_model_len=512)

    async def main():
        ae = AsyncEngine(engine, max_waiting_requests=0)
        ae.start()
        await ae.add([[1]], SamplingParams(max_tokens=400, ignore_eos=True), "running")   # the one slot
        with pytest.raises(EngineUnavailable):
            await start_think(ae, [{"role": "user", "content": "x"}], {"strategy": "greedy"}, "refused")
        assert ae.num_in_flight == 1
        await ae.shutdown()

    _run(main())
    engine.pool.check_empty()


def test_async_engine_ends_a_run_that_waits_on_nothing(byte_tokenizer_dir, monkeypatch):
    """A strategy that waits while none of its branches runs would hang its client: it fails instead
    (as offline `think` raises), and the loop goes on serving others."""
    def stuck(s):
        yield from s.start()
        while True:
            yield

    monkeypatch.setitem(STRATEGIES, "stuck", stuck)
    engine = make_tiny_engine(byte_tokenizer_dir)

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        stream = await start_think(ae, [{"role": "user", "content": "x"}], {"strategy": "stuck"}, "s")
        with pytest.raises(RequestFailed, match=STALLED):
            await stream.final()
        ok = await start_think(ae, [{"role": "user", "content": "y"}], {"strategy": "greedy", "max_tokens": 3}, "g")
        result = await ok.final()
        await ae.shutdown()
        return result

    assert _run(main()).usage["generated_tokens"] == 3
    assert not engine.requests
    engine.pool.check_empty()


# -- over HTTP, with the openai client, on the default model -----------------------------------------
@pytest.fixture(scope="module")
def server(default_server):
    return default_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def _wait_until_idle(server, seconds: float = 5.0) -> dict:
    """Metrics once nothing is in flight and every KV block is free again (fails after `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        m = server.metrics()
        if m["ponder:num_requests_in_flight"] == 0 and m["ponder:num_requests_running"] == 0 \
                and m["ponder:kv_cache_blocks_free"] == m["ponder:kv_cache_blocks_total"]:
            return m
        assert time.monotonic() < deadline, f"still busy: {m}"
        time.sleep(0.02)


@pytest.mark.slow
def test_self_consistency_returns_answer_candidates_and_usage(server, client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, seed=3,
                                           extra_body={"ponder": SC})
    ponder = reply.model_extra["ponder"]
    assert ponder["strategy"] == "self-consistency" and ponder["error"] is None
    assert len(ponder["candidates"]) == 4
    content = reply.choices[0].message.content
    assert content and content == ponder["answer"]
    assert content in [c["text"] for c in ponder["candidates"]]
    assert reply.choices[0].finish_reason == "stop"
    usage = ponder["usage"]
    assert set(usage) == {"prompt_tokens_computed", "prompt_tokens_cached", "generated_tokens", "scorer_calls"}
    assert reply.usage.completion_tokens == usage["generated_tokens"]
    assert usage["generated_tokens"] == sum(c["num_tokens"] for c in ponder["candidates"])
    assert 0 < usage["generated_tokens"] <= 4 * 24
    assert reply.usage.prompt_tokens == ponder["num_prompt_tokens"] > 0
    # the prompt is computed once for the four branches, not four times
    assert usage["prompt_tokens_computed"] <= reply.usage.prompt_tokens + 4
    _wait_until_idle(server)


@pytest.mark.slow
def test_streamed_progress_then_the_answer(server, client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, stream=True, stream_options={"include_usage": True},
        extra_body={"ponder": SC}))
    extras = [(c.model_extra or {}).get("ponder") for c in chunks]
    progress = [e for e in extras if e and e["event"] == "progress"]
    assert progress and any(e["branches_alive"] == 4 for e in progress)
    assert all(set(e) >= {"branches_alive", "branches_finished", "generated_tokens", "best_so_far"}
               for e in progress)
    [final] = [e for e in extras if e and e["event"] == "result"]
    # progress chunks carry an empty delta, so the content deltas add up to the answer
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text == final["answer"] and len(final["candidates"]) == 4
    assert chunks[0].choices[0].delta.role == "assistant"
    first_answer = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content)
    assert first_answer > extras.index(progress[0])
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == final["usage"]["generated_tokens"]
    _wait_until_idle(server)


@pytest.mark.slow
def test_streamed_beam_search_sends_its_own_events(server, client):
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=16, stream=True,
        extra_body={"ponder": {"strategy": "beam-search", "n": 4, "width": 2, "scorer": "confidence-tail",
                               "step_max_tokens": 4, "max_steps": 2, "delimiter": "\n\n"}})
    events = [c.model_extra["ponder"]["event"] for c in stream if (c.model_extra or {}).get("ponder")]
    assert "beam-step" in events and events[-1] == "result"
    _wait_until_idle(server)


@pytest.mark.slow
@pytest.mark.parametrize("ponder, extra, param", [
    ({"strategy": "no-such-strategy"}, {}, "ponder.strategy"),
    ({"strategy": 3}, {}, "ponder.strategy"),
    ({"strategy": "self-consistency", "n": 0}, {}, "ponder.n"),
    ({"strategy": "self-consistency", "n": "four"}, {}, "ponder.n"),
    ({"strategy": "self-consistency", "width": 2}, {}, "ponder.width"),
    ({"strategy": "self-consistency", "vote": "plurality"}, {}, "ponder.vote"),   # checked by the strategy
    ({"strategy": "adaptive-consistency", "stopping": "vibes"}, {}, "ponder.stopping"),   # and this
    ({"strategy": "best-of-n", "scorer": "vibes"}, {}, "ponder.scorer"),
    ({"strategy": "self-consistency", "temperature": -1}, {}, "ponder.temperature"),
    ({"strategy": "self-consistency", "extract": "x"}, {}, "ponder.extract"),
    ({"strategy": "beam-search", "scorer": None}, {}, "ponder.scorer"),              # checked by the strategy
    ({"strategy": "particle-filtering", "scorer": "confidence"}, {}, "ponder.scorer"),
    ({"strategy": "deepconf", "n": 4}, {}, "ponder.n"),                              # n < warmup (16)
    ("self-consistency", {}, "ponder"),
    ({"strategy": "self-consistency"}, {"n": 2}, "n"),
    ({"strategy": "self-consistency"}, {"top_p": 2.0}, "top_p"),
    ({"strategy": "self-consistency"}, {"stop": ["\n"]}, "stop"),
])
def test_bad_ponder_options_are_400_naming_the_field(server, client, ponder, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8,
                                       extra_body={"ponder": ponder}, **extra)
    error = refused.value.body
    assert refused.value.status_code == 400 and error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]
    assert server.metrics()["ponder:num_requests_in_flight"] == 0


@pytest.mark.slow
def test_disconnect_mid_stream_aborts_the_run_and_frees_its_blocks(server, client):
    before = server.metrics()
    count = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]
    body = {"model": MODEL, "messages": count, "max_tokens": 1000, "stream": True,
            "ponder": {"strategy": "self-consistency", "n": 4}}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if '"event":"progress"' in line:
                    break
    after = _wait_until_idle(server)
    done = 'ponder:request_success_total{finished_reason="stop"}'
    assert after.get(done, 0) == before.get(done, 0), "the run finished instead of being aborted"
    assert after["ponder:generation_tokens_total"] - before["ponder:generation_tokens_total"] < 4 * 1000


@pytest.mark.slow
def test_normal_requests_still_work_after_think_requests(server, client):
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8,
                                   extra_body={"ponder": {"strategy": "greedy"}})
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and "ponder" not in (reply.model_extra or {})
    assert reply.usage.completion_tokens <= 8
    _wait_until_idle(server)
