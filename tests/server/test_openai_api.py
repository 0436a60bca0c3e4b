"""The official `openai` client against `ponder serve` on the default model: chat and completions,
streamed and not, n, stop, max_tokens, seed, logprobs and usage, checked against the engine run
offline on the same prompts."""

from __future__ import annotations

import openai
import pytest

from ponder import SamplingParams

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
PROMPT = "The three primary colors are"
MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def offline(default_llm):
    """Greedy results of the engine itself, computed before the server takes the engine over."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    return {"completion": default_llm.generate([PROMPT], params)[0],
            "chat": default_llm.chat(MESSAGES, params)[0]}


@pytest.fixture(scope="module")
def client(offline, default_server):
    return openai.OpenAI(base_url=default_server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _joined(chunks, index=0, field="text") -> str:
    parts = []
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.index == index:
                parts.append(getattr(choice, field) if field == "text" else (choice.delta.content or ""))
    return "".join(parts)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_greedy_matches_engine_and_stream(client, offline):
    ref = offline["completion"]
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    choice = full.choices[0]
    assert choice.text == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason
    assert full.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert full.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert _joined(chunks) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_greedy_matches_engine_and_stream(client, offline):
    ref = offline["chat"]
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=MAX_TOKENS,
                                          temperature=0)
    choice = full.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.outputs[0].text
    assert full.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert full.usage.completion_tokens == len(ref.outputs[0].token_ids)

    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert _joined(chunks, field="delta") == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.usage is None for c in chunks)        # no include_usage: no usage in the stream


def test_n_choices_streamed_and_not(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0.9, seed=11, n=3)
    full = client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in full.choices) == [0, 1, 2]
    assert len({c.message.content for c in full.choices}) > 1          # three samples, not one
    assert 3 <= full.usage.completion_tokens <= 36
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    for c in full.choices:                 # a seeded sample is the same however it is delivered
        assert _joined(chunks, c.index, field="delta") == c.message.content
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, n=3, temperature=1.0)
    assert sorted(c.index for c in completion.choices) == [0, 1, 2]
    assert completion.usage.completion_tokens <= 15


def test_stop_string_cuts_text_streamed_and_not(client, offline):
    text = offline["completion"].outputs[0].text
    stop = text.split()[2]                 # a word in the middle of the greedy text
    cut = text[:text.index(stop)]
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert full.choices[0].text == cut
    assert full.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stop=stop, stream=True))
    assert _joined(chunks) == cut


def test_max_tokens_and_length_finish(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3,
                                          extra_body={"min_tokens": 3})
    assert chat.usage.completion_tokens == 3 and chat.choices[0].finish_reason == "length"


def test_seed_reproducible(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=1234, **kwargs).choices[0].text
    b = client.completions.create(seed=1234, **kwargs).choices[0].text
    others = {client.completions.create(seed=s, **kwargs).choices[0].text for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1


def test_completion_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    assert "".join(lp.tokens) == out.choices[0].text
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and top[token] == chosen
        assert chosen == pytest.approx(max(top.values()))      # greedy picks the most likely token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_chat_logprobs_streamed_and_not(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    out = client.chat.completions.create(**kwargs)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.bytes == list(entry.token.encode())
    streamed = [e for c in client.chat.completions.create(**kwargs, stream=True)
                for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_usage_of_token_prompt_and_prompt_list(client):
    out = client.completions.create(model=MODEL, prompt=[[504, 3575, 282], [504, 1296]], max_tokens=4,
                                    temperature=0, extra_body={"ignore_eos": True}, user="test-user")
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 8


def test_continuous_usage_stats_puts_usage_in_every_chunk(client):
    """vLLM's stream_options.continuous_usage_stats (what guidellm sends): every chunk carries the
    usage so far, the last one the totals."""
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, stream=True)
    chunks = list(client.chat.completions.create(
        **kwargs, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)
    completion = [c.usage.completion_tokens for c in chunks]
    assert completion[0] == 0 and completion == sorted(completion)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert len({c.usage.prompt_tokens for c in chunks}) == 1
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    # without include_usage it asks for nothing (as in vLLM)
    plain = list(client.chat.completions.create(**kwargs, stream_options={"continuous_usage_stats": True}))
    assert all(c.usage is None for c in plain)


def test_harmless_client_extras_are_accepted(client):
    """Fields SDKs and agents send that change nothing here: accepted, not a 400."""
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                           metadata={"run": "t1"}, store=False, parallel_tool_calls=False,
                                           service_tier="auto")
    assert reply.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError):          # a wrong type is still refused
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, store="yes")
