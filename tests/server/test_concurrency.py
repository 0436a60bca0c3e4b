"""Many streaming clients batch together; a client that goes away is aborted at once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from ponder import SamplingParams

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
NUM_CLIENTS = 32
MAX_TOKENS = 12


def _prompt(i: int) -> str:
    return f"Request {i}: here is a short list of things to remember about the number {i * 7}:"


@pytest.fixture(scope="module")
def offline(default_llm):
    """The engine's own greedy outputs for every prompt, before the server takes the engine over."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    return [o.outputs[0].text for o in default_llm.generate([_prompt(i) for i in range(NUM_CLIENTS)], params)]


@pytest.fixture(scope="module")
def server(offline, default_server):
    return default_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def _batched_steps(metrics: dict) -> float:
    """Engine steps that gave more than one sequence a token."""
    return metrics["ponder:iteration_sequences_count"] - metrics['ponder:iteration_sequences_bucket{le="1.0"}']


def test_32_concurrent_streams_complete_in_shared_batches(server, client, offline):
    before = server.metrics()

    def run(i: int) -> tuple[str, str | None, int]:
        text, finish, usage = [], None, 0
        for chunk in client.completions.create(model=MODEL, prompt=_prompt(i), max_tokens=MAX_TOKENS,
                                               temperature=0, stream=True, stream_options={"include_usage": True}):
            for choice in chunk.choices:
                text.append(choice.text)
                finish = choice.finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        return "".join(text), finish, usage

    with ThreadPoolExecutor(NUM_CLIENTS) as pool:
        results = list(pool.map(run, range(NUM_CLIENTS)))
    assert [r[0] for r in results] == offline                # batching does not change greedy output
    assert all(r[1] in ("stop", "length") and r[2] >= 1 for r in results)
    after = server.metrics()
    assert _batched_steps(after) > _batched_steps(before)
    assert after['ponder:iteration_sequences_bucket{le="8.0"}'] < after["ponder:iteration_sequences_count"]
    assert after["ponder:max_batch_seqs"] > 8
    assert after["ponder:generation_tokens_total"] - before["ponder:generation_tokens_total"] == sum(
        r[2] for r in results)


def test_disconnect_mid_stream_frees_everything_within_a_second(server, client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to 1000."}],
                                            max_tokens=2000, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(4), stream):
        pass
    assert server.metrics()["ponder:num_requests_running"] == 1
    stream.close()
    dropped = time.monotonic()
    while True:
        m = server.metrics()
        if m["ponder:num_requests_running"] == 0 and m["ponder:num_requests_in_flight"] == 0 \
                and m["ponder:kv_cache_usage_perc"] == 0.0:
            break
        assert time.monotonic() - dropped < 1.0, f"still held a second after the disconnect: {m}"
        time.sleep(0.02)
    # the server is unharmed
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_disconnect_while_waiting_for_a_non_streamed_response(server):
    import httpx

    with httpx.Client(timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(server.url + "/v1/completions", json={"prompt": "Count to 1000.", "max_tokens": 2000,
                                                            "ignore_eos": True})
    dropped = time.monotonic()
    while server.metrics()["ponder:num_requests_in_flight"] != 0:
        assert time.monotonic() - dropped < 1.0, "a non-streamed request outlived its client"
        time.sleep(0.02)
