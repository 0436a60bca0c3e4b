"""Structured output over HTTP: response_format, vLLM's structured_outputs and guided_* fields, on
both endpoints, streamed and not; bad constraints are 400s naming the field; the openai SDK's
parse() helper gets an instance of its model back."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pydantic
import pytest

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


def _text(r: httpx.Response) -> tuple[str, str]:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice.get("text", choice.get("message", {}).get("content")), choice["finish_reason"]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_each_spelling_constrains_the_text(tiny_server, path):
    base = {"prompt": "abc"} if path == COMPLETIONS else {"messages": USER}
    base |= {"max_tokens": 40, "temperature": 1.0, "seed": 5}
    with httpx.Client(base_url=tiny_server.url, timeout=60) as http:
        assert _text(http.post(path, json=base | {"guided_regex": "[xy]{4}"}))[0] in \
            {a + b + c + d for a in "xy" for b in "xy" for c in "xy" for d in "xy"}
        assert _text(http.post(path, json=base | {"guided_choice": ["red", "green"]}))[0] in ("red", "green")
        assert _text(http.post(path, json=base | {"structured_outputs": {"choice": ["up", "down"]}}))[0] in ("up", "down")
        text, _ = _text(http.post(path, json=base | {"structured_outputs": {"json": SCHEMA,
                                                                           "disable_any_whitespace": True}}))
        assert json.loads(text) in ({"ok": True}, {"ok": False})
        grammar = _text(http.post(path, json=base | {"guided_grammar": 'root ::= "n" [0-9]'}))[0]
        assert re.fullmatch("n[0-9]", grammar)
        fmt = {"type": "json_schema", "json_schema": {"name": "ok", "schema": SCHEMA, "strict": True}}
        text, reason = _text(http.post(path, json=base | {"response_format": fmt}))
        assert reason == "length" or json.loads(text) in ({"ok": True}, {"ok": False})
        assert _text(http.post(path, json=base | {"response_format": {"type": "text"}}))[1] in ("stop", "length")


def test_streamed_constrained_text_is_the_whole_text(tiny_server):
    body = {"prompt": "abc", "max_tokens": 40, "temperature": 1.0, "seed": 9, "guided_regex": "[a-c]{6}"}
    with httpx.Client(base_url=tiny_server.url, timeout=60) as http:
        whole, _ = _text(http.post(COMPLETIONS, json=body))
        events = http.post(COMPLETIONS, json=body | {"stream": True}).text.split("\n\n")
        chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
        assert re.fullmatch("[a-c]{6}", whole)


@pytest.mark.parametrize("extra, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"guided_regex": "(oops"}, "guided_regex"),
    ({"guided_grammar": "start: missing"}, "guided_grammar"),
    ({"structured_outputs": {"grammar": "oops"}}, "structured_outputs.grammar"),   # found by test_openapi
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.regex"),
    ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": 5}}}}}, "structured_outputs.json"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
])
def test_bad_constraints_are_400s_naming_the_field(tiny_server, extra, field):
    with httpx.Client(base_url=tiny_server.url, timeout=60) as http:
        r = http.post(CHAT, json={"messages": USER, "max_tokens": 4, **extra})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field, r.json()
        assert http.post(COMPLETIONS, json={"prompt": "ok", "max_tokens": 2}).status_code == 200
    assert tiny_server.async_engine.num_in_flight == 0


def test_a_think_request_keeps_every_branch_to_the_constraint(tiny_server):
    body = {"messages": USER, "max_tokens": 20, "temperature": 1.0, "seed": 2, "guided_choice": ["12", "7"],
            "ponder": {"strategy": "self-consistency", "n": 4}}
    with httpx.Client(base_url=tiny_server.url, timeout=60) as http:
        r = http.post(CHAT, json=body)
        assert r.status_code == 200, r.text
        reply = r.json()
        assert reply["choices"][0]["message"]["content"] in ("12", "7")
        assert {c["text"] for c in reply["ponder"]["candidates"]} <= {"12", "7"}
        bad = http.post(CHAT, json={**body, "ponder": {"strategy": "self-consistency", "structured_outputs": {}}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "ponder.structured_outputs"


class Answer(pydantic.BaseModel):
    city: str
    population: int


@pytest.mark.slow
def test_openai_parse_helper_gets_its_model_back(default_server):
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    completion = client.chat.completions.parse(
        model="smollm2-135m-instruct", response_format=Answer, max_tokens=64, temperature=0,
        messages=[{"role": "user", "content": "Name a city and its population as JSON."}])
    message = completion.choices[0].message
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(message.parsed, Answer)
    else:          # cut at max_tokens: still a prefix of a JSON object
        assert message.content.startswith("{")
    obj = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=48, temperature=0,
                                         response_format={"type": "json_object"},
                                         messages=[{"role": "user", "content": "Describe a cat in JSON."}])
    assert obj.choices[0].message.content.lstrip().startswith("{")


# -- ten schemas on the default model: every output that finishes validates ---------------------------
_NAME = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": _NAME, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "number", "minimum": -10, "maximum": 10}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 10}},
     "required": ["ok", "note"], "additionalProperties": False},
    {"type": "object", "properties": {"city": _NAME, "population": {"type": "integer", "minimum": 0, "maximum": 10**8}},
     "required": ["city", "population"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "label": {"enum": ["a", "b"]}},
        "required": ["id", "label"], "additionalProperties": False}}}, "required": ["items"],
     "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                                      "grade": {"type": "string", "pattern": "^[A-F]$"}},
     "required": ["score", "grade"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999},
                                                           {"enum": ["unknown"]}]},
                                      "steps": {"type": "array", "items": {"type": "string", "maxLength": 16},
                                                "maxItems": 2}},
     "required": ["answer", "steps"], "additionalProperties": False},
]


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_ten_schemas_validate_whenever_the_output_finishes(default_server, stream):
    import jsonschema

    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    finished = 0
    for i, schema in enumerate(SCHEMAS):
        kwargs = dict(model="smollm2-135m-instruct", n=3, max_tokens=96, temperature=0.8, seed=i,
                      response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}},
                      messages=[{"role": "user", "content": "Reply with a JSON value."}])
        if stream:
            texts, reasons = ["", "", ""], [None] * 3
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for choice in chunk.choices:
                    texts[choice.index] += choice.delta.content or ""
                    reasons[choice.index] = choice.finish_reason or reasons[choice.index]
        else:
            choices = client.chat.completions.create(**kwargs).choices
            texts, reasons = [c.message.content for c in choices], [c.finish_reason for c in choices]
        for text, reason in zip(texts, reasons):
            if reason == "stop":
                jsonschema.validate(json.loads(text), schema)
                finished += 1
    assert finished >= len(SCHEMAS)       # most of the 30 finish; every one that does validates


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["self-consistency", "best-of-n"])
def test_think_strategies_honour_a_schema_in_every_candidate(default_llm, strategy):
    import jsonschema

    from ponder import StructuredOutputs

    schema = SCHEMAS[6]
    result = default_llm.think("Name a city and its population.", strategy, n=4, temperature=0.8, seed=1,
                               max_tokens=64, structured_outputs=StructuredOutputs(json=schema))
    assert len(result.candidates) == 4
    for c in result.candidates:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)
