"""Bad requests get a 4xx with an OpenAI-style error body naming the field, never a 5xx, and never
disturb the server; auth (401) and overload (503 with Retry-After)."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ponder.server.app import ServerConfig
from tests.server.conftest import ANY, check_error

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def _base(path: str) -> dict:
    return {"prompt": "Hello", "max_tokens": 1} if path == COMPLETIONS else {"messages": USER, "max_tokens": 1}


def _bad_requests() -> list[tuple[str, bytes | dict, object]]:
    """(path, body, field the error must name) for over 200 malformed or out-of-range requests."""
    cases: list[tuple[str, bytes | dict, object]] = []
    not_int = ["1", 1.5, True, [1], {"a": 1}]
    not_float = ["0.5", True, [0.5], {"x": 1.0}]
    not_bool = ["true", 1, 0, [True], {}]
    not_str = [5, True, {"a": "b"}, 1.5]
    wrong_types = {
        "n": not_int, "max_tokens": not_int, "seed": not_int, "top_k": not_int, "min_tokens": not_int,
        "temperature": not_float, "top_p": not_float, "presence_penalty": not_float,
        "frequency_penalty": not_float, "min_p": not_float, "repetition_penalty": not_float,
        "stream": not_bool, "ignore_eos": not_bool, "skip_special_tokens": not_bool,
        "include_stop_str_in_output": not_bool, "user": not_str, "model": not_str,
        "stop": [5, {"a": 1}, [1, 2], True], "logit_bias": ["x", [1], {"1": "a"}, 3],
        "stop_token_ids": ["x", [1.5], ["a"], 3], "stream_options": ["x", {"include_usage": "yes"},
                                                                     {"unknown": True}, [1]],
    }
    out_of_range = {
        "n": [0, -1, 100_000, 10**18], "max_tokens": [0, -5, 10**9], "temperature": [-0.1, -5.0],
        "top_p": [0.0, 1.5, -1.0], "presence_penalty": [2.5, -3.0], "frequency_penalty": [2.1, -2.1],
        "top_k": [-2, -100], "min_p": [-0.1, 1.5], "repetition_penalty": [0.0, -1.0],
        "min_tokens": [-1, 5],           # 5 > max_tokens 1
        "logit_bias": [{"abc": 1.0}, {"1": 500.0}, {"999999999": 1.0}, {"-1": 1.0}],
        "stop_token_ids": [[-1], [10**9]], "stop": [[""], ""],
    }
    for path in (COMPLETIONS, CHAT):
        for field, values in [*wrong_types.items(), *out_of_range.items()]:
            cases += [(path, {**_base(path), field: v}, field) for v in values]
        for field in ("foo", "tools", "functions", "response_format", "best_of", "suffix") + (
                ("prompt_logprobs", "echo") if path == CHAT else ()):
            cases.append((path, {**_base(path), field: 1}, field))
        cases += [(path, {**_base(path), "model": "gpt-4"}, "model")]
        for raw in (b"", b"{", b"null", b"[]", b'"text"', b"42", b'{"prompt": }', b"{prompt: 1}",
                    b'{"max_tokens": 1,}', b'{"a": "\xff\xfe"}', b"\xc3\x28", b"\x00\x01",
                    b'{"messages": "\xed\xa0\x80"}', b'{"prompt": "\\ud800"}'):
            cases.append((path, raw, ANY))
    cases += [(COMPLETIONS, {"prompt": p, "max_tokens": 1}, "prompt")
              for p in ("", [], [[]], [-1], [10**9], [1.5], [[1], ["a"]], None, {"a": 1},
                        "hello " * 9000, [100] * 9000, ["hi"] * 100)]
    cases += [(COMPLETIONS, {"max_tokens": 1}, "prompt"), (COMPLETIONS, {**_base(COMPLETIONS), "echo": 1}, "echo"),
              (COMPLETIONS, {**_base(COMPLETIONS), "prompt_logprobs": 21}, "prompt_logprobs"),
              (COMPLETIONS, {**_base(COMPLETIONS), "prompt_logprobs": True}, "prompt_logprobs"),
              (COMPLETIONS, {**_base(COMPLETIONS), "echo": True, "logprobs": 21}, "logprobs"),
              (COMPLETIONS, {**_base(COMPLETIONS), "logprobs": 21}, "logprobs"),
              (COMPLETIONS, {**_base(COMPLETIONS), "logprobs": -1}, "logprobs"),
              (COMPLETIONS, {**_base(COMPLETIONS), "logprobs": True}, "logprobs")]
    cases += [(CHAT, {"messages": m, "max_tokens": 1}, "messages")
              for m in ([], "hi", [{}], [{"content": "x"}], [{"role": "bogus", "content": "x"}],
                        [{"role": "user", "content": 5}], [{"role": "user", "content": "x", "extra": 1}],
                        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                        [{"role": "user", "content": [{"type": "text"}]}], [["user", "hi"]], None,
                        [{"role": "user", "content": "hello " * 9000}])]
    cases += [(CHAT, {"max_tokens": 1}, "messages"),
              (CHAT, {**_base(CHAT), "top_logprobs": 3}, "top_logprobs"),
              (CHAT, {**_base(CHAT), "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
              (CHAT, {**_base(CHAT), "logprobs": 1}, "logprobs"),
              (CHAT, {**_base(CHAT), "max_completion_tokens": 0}, "max_completion_tokens"),
              (CHAT, {"messages": USER, "max_completion_tokens": 10**6}, "max_completion_tokens")]
    return cases


@pytest.mark.slow
def test_200_bad_requests_on_the_default_model(default_server):
    cases = _bad_requests()
    assert len(cases) >= 200
    with httpx.Client(base_url=default_server.url, timeout=60) as http:
        for path, body, field in cases:
            r = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
            check_error(r, field)
        for method, path in (("GET", "/v1/completions"), ("GET", "/nowhere"), ("DELETE", "/v1/models")):
            check_error(http.request(method, path))
        r = http.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert http.get("/health").status_code == 200
    assert default_server.async_engine.num_in_flight == 0


def test_errors_name_the_field_and_context(tiny_server):
    with httpx.Client(base_url=tiny_server.url) as http:
        long_prompt = check_error(http.post(COMPLETIONS, json={"prompt": "x" * 200}), "prompt")
        assert long_prompt["code"] == "context_length_exceeded" and "128" in long_prompt["message"]
        too_much = check_error(http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 127}), "max_tokens")
        assert too_much["code"] == "context_length_exceeded"
        assert "top_p" in check_error(http.post(COMPLETIONS, json={"prompt": "hi", "top_p": 2}), "top_p")["message"]
        unknown = check_error(http.post(CHAT, json={"messages": USER, "tool_box": []}), "tool_box")
        assert "Unrecognized" in unknown["message"]
        check_error(http.post(CHAT, json={"messages": USER, "tools": "x"}), "tools")
        assert http.post(COMPLETIONS, json={"prompt": "hi", "model": "nope"}).status_code == 404
        malformed = check_error(http.post(COMPLETIONS, content=b"{oops"))
        assert malformed["code"] == "invalid_json"
        huge = http.post(COMPLETIONS, content=b'{"prompt": "' + b"a" * (17 << 20) + b'"}')
        assert huge.status_code == 413 and huge.json()["error"]["message"]


# -- property-based fuzzing -------------------------------------------------------------------------
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
_FIELDS = ["prompt", "messages", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
           "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
           "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "user", "stream",
           "stream_options", "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "model", "zzz"]
_value = {
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 300), max_size=20) | _json,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                                "content": st.text(max_size=30) | _json}), max_size=3) | _json,
    "n": st.integers(-2, 4) | _json, "max_tokens": st.integers(-2, 40) | _json, "stream": st.booleans() | _json,
    "temperature": st.floats(-1, 3) | _json, "top_p": st.floats(-0.5, 1.5) | _json,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3) | _json,
    "logprobs": st.integers(-1, 25) | st.booleans() | _json, "top_logprobs": st.integers(-1, 25) | _json,
    "logit_bias": st.dictionaries(st.integers(-5, 400).map(str), st.floats(-150, 150), max_size=3) | _json,
    "top_k": st.integers(-3, 10**20) | _json, "seed": st.integers(-2**70, 2**70) | _json,
}


@st.composite
def _request(draw):
    fields = draw(st.lists(st.sampled_from(_FIELDS), unique=True, max_size=7))
    body = {f: draw(_value.get(f, _json)) for f in fields}
    return draw(st.sampled_from([COMPLETIONS, CHAT])), body


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=_request())
def test_fuzzed_requests_never_fail_the_server(tiny_server, request):
    path, body = request
    with httpx.Client(base_url=tiny_server.url, timeout=60) as http:
        r = http.post(path, content=json.dumps(body))
        if r.status_code == 200:
            if body.get("stream") is True:
                assert r.text.rstrip().endswith("data: [DONE]")
            else:
                assert r.json()["choices"]
        else:
            check_error(r)
        ok = http.post(COMPLETIONS, json={"prompt": "ok", "max_tokens": 2})
        assert ok.status_code == 200


# -- auth and overload --------------------------------------------------------------------------------
def test_api_key_required_when_set(start_tiny_server):
    server = start_tiny_server(ServerConfig(api_key="sekret"))
    body = {"prompt": "hi", "max_tokens": 2}
    with httpx.Client(base_url=server.url) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"},
                        {"Authorization": "Basic sekret"}):
            error = check_error(http.post(COMPLETIONS, json=body, headers=headers))
            assert error["code"] == "invalid_api_key"
            assert http.get("/v1/models", headers=headers).status_code == 401
        assert http.post(COMPLETIONS, json=body, headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=server.url + "/v1", api_key="sekret").models.list().data[0].id == "tiny"


def test_overload_gets_503_with_retry_after(start_tiny_server):
    server = start_tiny_server(ServerConfig(max_waiting_requests=1), max_num_seqs=1, max_model_len=512)
    long = {"prompt": "a", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", COMPLETIONS, json=long) as running:
            lines = running.iter_lines()    # (a dropped iterator would close the response)
            next(lines)                                         # running: the one slot is taken
            with http.stream("POST", COMPLETIONS, json=long) as waiting:
                assert waiting.status_code == 200               # queued: the one waiting place is taken
                r = http.post(COMPLETIONS, json={"prompt": "b", "max_tokens": 2})
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "server_overloaded"
                assert server.metrics()['ponder:request_rejected_total{reason="overloaded"}'] == 1
                assert waiting.read().decode().rstrip().endswith("[DONE]")
        assert http.post(COMPLETIONS, json={"prompt": "b", "max_tokens": 2}).status_code == 200


def test_bad_request_does_not_disturb_a_running_one(start_tiny_server):
    server = start_tiny_server(max_model_len=512)
    body = {"prompt": "steady", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        alone = http.post(COMPLETIONS, json=body).json()["choices"][0]["text"]
        result = {}
        worker = threading.Thread(target=lambda: result.update(
            text=http.post(COMPLETIONS, json=body).json()["choices"][0]["text"]))
        worker.start()
        for path, raw, _ in _bad_requests()[:60]:
            r = http.post(path, content=raw) if isinstance(raw, bytes) else http.post(path, json=raw)
            assert r.status_code < 500
        worker.join()
    assert result["text"] == alone
