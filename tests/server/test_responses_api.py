"""The Responses API (`/v1/responses`): text in and out, instructions, max_output_tokens,
sampling, function tools and text.format; streamed as typed events; the openai SDK's
`client.responses.create` works both ways."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                          "required": ["city"]}}


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_text_in_text_out_whole_and_streamed(tiny_server):
    body = {"input": "hello", "instructions": "Be brief.", "max_output_tokens": 6, "temperature": 1.0,
            "top_p": 0.9, "metadata": {"k": "v"}, "store": False}
    with httpx.Client(base_url=tiny_server.url, timeout=60) as http:
        whole = http.post("/v1/responses", json=body).json()
        assert whole["object"] == "response" and whole["status"] in ("completed", "incomplete")
        [message] = whole["output"]
        assert message["type"] == "message" and message["role"] == "assistant"
        text = message["content"][0]["text"]
        assert whole["usage"]["output_tokens"] <= 6 and whole["usage"]["input_tokens"] > 0
        if whole["status"] == "incomplete":
            assert whole["incomplete_details"] == {"reason": "max_output_tokens"}
        streamed = http.post("/v1/responses", json={**body, "stream": True})
        events = _events(streamed.text)
        kinds = [e["type"] for e in events]
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[-1] in ("response.completed", "response.incomplete")
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert "event: response.created" in streamed.text and "[DONE]" not in streamed.text
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        final = events[-1]["response"]["output"]
        if deltas:
            assert final[0]["content"][0]["text"] == deltas
        assert isinstance(text, str)


@pytest.fixture(scope="module")
def long_context_server(byte_tokenizer_dir):
    """A tiny model with room for the tools' fallback prompt (the byte tokenizer spends a token a byte)."""
    from ponder.config import EngineConfig
    from ponder.engine.engine import LLMEngine
    from ponder.model.loader import LoadedModel
    from ponder.model.tokenizer import Tokenizer
    from tests.conftest import tiny_config, tiny_model
    from tests.server.conftest import ServerThread

    cfg = tiny_config(max_position_embeddings=2048)
    loaded = LoadedModel(tiny_model(cfg), cfg, Tokenizer(byte_tokenizer_dir, cfg.eos_token_ids), "tiny")
    server = ServerThread(LLMEngine(EngineConfig(model="tiny", num_kv_blocks=1024, block_size=4), loaded=loaded))
    yield server
    server.stop()


def test_function_call_and_its_output(long_context_server):
    with httpx.Client(base_url=long_context_server.url, timeout=60) as http:
        r = http.post("/v1/responses", json={"input": "weather?", "tools": [WEATHER], "tool_choice": "required",
                                             "max_output_tokens": 150, "temperature": 1.0})
        assert r.status_code == 200, r.text
        calls = [i for i in r.json()["output"] if i["type"] == "function_call"]
        assert calls and calls[0]["name"] == "get_weather" and "city" in json.loads(calls[0]["arguments"])
        follow = [{"role": "user", "content": "weather?"}, {**calls[0], "status": None},
                  {"type": "function_call_output", "call_id": calls[0]["call_id"], "output": "sunny"}]
        r = http.post("/v1/responses", json={"input": follow, "tools": [WEATHER], "max_output_tokens": 4})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, field", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": []}, "input"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "bogus"}}}},
     "text.format.schema"),
    ({"input": "x", "temperature": -1}, "temperature"),
    ({"input": "x", "bogus": 1}, "bogus"),
])
def test_bad_requests_name_the_responses_field(tiny_server, body, field):
    with httpx.Client(base_url=tiny_server.url, timeout=60) as http:
        r = http.post("/v1/responses", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field, r.json()


@pytest.mark.slow
def test_openai_sdk_responses_create(default_server):
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    kwargs = dict(model="smollm2-135m-instruct", input="Say hello in three words.", max_output_tokens=48,
                  temperature=0, instructions="You are terse.")
    reply = client.responses.create(**kwargs)
    assert reply.status in ("completed", "incomplete") and reply.output_text
    events = list(client.responses.create(stream=True, **kwargs))
    assert events[-1].type == f"response.{reply.status}"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == reply.output_text
    assert events[-1].response.output_text == reply.output_text
    if reply.status == "completed":          # the SDK's stream helper wants response.completed
        with client.responses.stream(**kwargs) as stream:
            assert stream.get_final_response().output_text == reply.output_text
