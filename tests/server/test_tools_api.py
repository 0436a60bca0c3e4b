"""Tool calling over HTTP: Qwen2.5-Coder-0.5B's own template, SmolLM2's fallback, tool_choice
auto / none / required / named, streamed calls, and the 400s for tools that cannot work."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import ServerThread

CHAT = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 32}}, "required": ["tz"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now? Reply in one short sentence."}]
QWEN = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def qwen():
    from ponder.config import EngineConfig
    from ponder.engine.engine import LLMEngine

    server = ServerThread(LLMEngine(EngineConfig(model=QWEN, num_kv_blocks=512)))
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    server.stop()
    server.engine.pool.check_empty()


def _args(call, tool=WEATHER) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


@pytest.mark.slow
def test_qwen_round_trip_call_result_answer(qwen):
    first = qwen.chat.completions.create(model=QWEN, messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                         max_tokens=100)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and _args(call)["city"].lower().startswith("paris")
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in choice.message.tool_calls]},
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    final = qwen.chat.completions.create(model=QWEN, messages=history, tools=[WEATHER, TIME], tool_choice="none",
                                         temperature=0, max_tokens=60)
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content
    assert not final.choices[0].message.tool_calls


@pytest.mark.slow
def test_qwen_streamed_call_reassembles_to_the_whole_one(qwen):
    kwargs = dict(model=QWEN, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=100)
    whole = qwen.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in qwen.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for part in choice.delta.tool_calls or []:
                entry = calls.setdefault(part.index, {"name": "", "arguments": "", "id": None})
                entry["id"] = entry["id"] or part.id
                entry["name"] += (part.function.name or "") if part.function else ""
                entry["arguments"] += (part.function.arguments or "") if part.function else ""
    assert reasons[-1] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole]
    assert all(c["id"] for c in calls.values())


@pytest.mark.slow
def test_required_always_yields_a_valid_call(qwen):
    for seed in range(4):
        choice = qwen.chat.completions.create(model=QWEN, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                              temperature=1.0, seed=seed, max_tokens=120).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            _args(call, WEATHER if call.function.name == "get_weather" else TIME)


@pytest.mark.slow
def test_smollm2_named_function_gives_valid_arguments(default_server):
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    for seed in range(3):
        choice = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
            tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
            temperature=0.8, seed=seed, max_tokens=80).choices[0]
        assert choice.finish_reason == "tool_calls"
        assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
        _args(choice.message.tool_calls[0], TIME)


@pytest.mark.parametrize("extra, field", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
])
def test_tools_that_cannot_work_are_400s(tiny_server, extra, field):
    with httpx.Client(base_url=tiny_server.url, timeout=60) as http:
        r = http.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field, r.json()


def test_a_template_without_tools_gets_the_fallback(start_tiny_server):
    """The tools go into the system message, earlier calls become <tool_call> blocks, results
    <tool_response> turns; the tiny model's ChatML-like template renders them."""
    from ponder.server.protocol import ChatCompletionRequest, EngineLimits

    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "x"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    server = start_tiny_server(max_model_len=512)
    body = ChatCompletionRequest(messages=history, tools=[WEATHER], max_tokens=3)
    [ids] = body.prompt_token_ids(server.engine.tokenizer, EngineLimits(10**6, 260, 8))
    text = server.engine.tokenizer.decode(ids, False)
    assert "<tools>" in text and '"get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "x"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
