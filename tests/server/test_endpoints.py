"""vLLM's /tokenize and /detokenize, CORS (--allowed-origins) and X-Request-Id, on the tiny model."""

from __future__ import annotations

import re

import httpx
import pytest

import ponder.server.tokenization as tokenization
from ponder.server.app import ServerConfig
from tests.server.conftest import check_error

USER = [{"role": "user", "content": "hi there"}]
RENDERED = "<|im_start|>user\nhi there<|im_end|>\n"        # the byte tokenizer's chat template
ORIGIN, OTHER = "https://app.example", "https://elsewhere.example"


# -- /tokenize and /detokenize ------------------------------------------------------------------------
def test_a_prompt_round_trips(tiny_server):
    text = "Hello, wörld"
    with httpx.Client(base_url=tiny_server.url) as http:
        r = http.post("/tokenize", json={"prompt": text, "return_token_strs": True})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["tokens"] == tiny_server.engine.tokenizer.encode(text)
        assert answer["count"] == len(text.encode()) and answer["max_model_len"] == 128
        assert len(answer["token_strs"]) == answer["count"] and answer["token_strs"][0] == "H"
        assert "token_strs" not in http.post("/tokenize", json={"prompt": text}).json()
        assert http.post("/detokenize", json={"tokens": answer["tokens"]}).json() == {"prompt": text}
        assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_chat_messages_round_trip_as_the_template_renders_them(tiny_server):
    with httpx.Client(base_url=tiny_server.url) as http:
        answer = http.post("/tokenize", json={"messages": USER, "model": "tiny"}).json()
        text = http.post("/detokenize", json={"tokens": answer["tokens"], "model": "tiny"}).json()["prompt"]
        assert text == RENDERED + "<|im_start|>assistant\n"
        # the count is the prompt a chat completion of the same messages gets
        chat = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}).json()
        assert chat["usage"]["prompt_tokens"] == answer["count"]
        bare = http.post("/tokenize", json={"messages": USER, "add_generation_prompt": False}).json()
        assert http.post("/detokenize", json={"tokens": bare["tokens"]}).json()["prompt"] == RENDERED


@pytest.mark.parametrize("path, body, field", [
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [65, 260]}, "tokens"),                # the tiny model's vocabulary is 260
    ("/detokenize", {"tokens": [10**30]}, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, "tokens"),
    ("/detokenize", {"tokens": 5}, "tokens"),
    ("/detokenize", {}, "tokens"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, "add_generation_prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "bogus", "content": "x"}]}, "messages.0.role"),
    ("/tokenize", {"messages": USER, "prompt": "x"}, "prompt"),
    ("/tokenize", {"prompt": "x", "": 1}, ""),          # an unknown field named "" (found by test_openapi)
])
def test_bad_bodies_name_the_field(tiny_server, path, body, field):
    r = httpx.post(tiny_server.url + path, json=body)
    assert r.status_code == 400
    check_error(r, field)


def test_tokenizer_routes_check_the_model_and_the_key(start_tiny_server):
    server = start_tiny_server(ServerConfig(api_key="k3y"))
    with httpx.Client(base_url=server.url) as http:
        assert check_error(http.post("/tokenize", json={"prompt": "x"}))["code"] == "invalid_api_key"
        assert http.post("/detokenize", json={"tokens": [1]}).status_code == 401
        auth = {"Authorization": "Bearer k3y"}
        assert http.post("/tokenize", json={"prompt": "x"}, headers=auth).json()["count"] == 1
        wrong = http.post("/detokenize", json={"tokens": [1], "model": "gpt-4"}, headers=auth)
        assert wrong.status_code == 404 and check_error(wrong, "model")["code"] == "model_not_found"


# -- CORS ---------------------------------------------------------------------------------------------------
def _preflight(http: httpx.Client, origin: str) -> httpx.Response:
    return http.options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_answers_allowed_origins_only(start_tiny_server, tiny_server):
    server = start_tiny_server(ServerConfig(allowed_origins=[ORIGIN], api_key="k3y"))
    with httpx.Client(base_url=server.url) as http:
        allowed = _preflight(http, ORIGIN)        # browsers send no key on a preflight: none is asked
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in allowed.headers["access-control-allow-methods"]
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-origin" not in _preflight(http, OTHER).headers
        call = http.get("/v1/models", headers={"Origin": ORIGIN, "Authorization": "Bearer k3y"})
        assert call.status_code == 200 and call.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in call.headers["access-control-expose-headers"].lower()
        assert "access-control-allow-origin" not in http.get("/health", headers={"Origin": OTHER}).headers
    with httpx.Client(base_url=tiny_server.url) as http:       # no --allowed-origins: no CORS at all
        assert "access-control-allow-origin" not in _preflight(http, ORIGIN).headers


# -- X-Request-Id ---------------------------------------------------------------------------------------------
def test_request_ids_are_echoed_or_made(tiny_server, monkeypatch):
    body = {"prompt": "hi", "max_tokens": 2}
    with httpx.Client(base_url=tiny_server.url) as http:
        answers = {
            "whole": http.post("/v1/completions", json=body, headers={"X-Request-Id": "mine-1"}),
            "error": http.post("/v1/completions", json={"prompt": 5}, headers={"X-Request-Id": "mine-2"}),
            "no route": http.get("/nowhere", headers={"X-Request-Id": "mine-3"}),
        }
        with http.stream("POST", "/v1/completions", json={**body, "stream": True},
                         headers={"X-Request-Id": "mine-4"}) as stream:
            answers["stream"] = stream
            assert stream.read().decode().rstrip().endswith("[DONE]")
        monkeypatch.setattr(tokenization, "tokenize", _fail)    # an unhandled error: Starlette's 500
        answers["crash"] = http.post("/tokenize", json={"prompt": "x"}, headers={"X-Request-Id": "mine-5"})
        assert answers["crash"].status_code == 500 and answers["crash"].json()["error"]["type"] == "server_error"
        for i, (what, answer) in enumerate(answers.items(), 1):
            assert answer.headers["x-request-id"] == f"mine-{i}", what
        made = [http.get("/health").headers["x-request-id"],
                http.post("/v1/completions", json={"prompt": 5}).headers["x-request-id"],
                http.post("/tokenize", json={"prompt": "x"}).headers["x-request-id"]]
    assert all(re.fullmatch("[0-9a-f]{32}", made_id) for made_id in made) and len(set(made)) == 3


def _fail(*args):
    raise RuntimeError("boom")
