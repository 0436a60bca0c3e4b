"""Completions' echo and prompt logprobs: lm-evaluation-harness's loglikelihood request (batched
token-id prompts, echo, max_tokens 1, logprobs 1, temperature 0) returns the prompt logprobs the
engine gives offline and when it decodes the same tokens one by one."""

from __future__ import annotations

import json

import httpx
import pytest

from ponder import SamplingParams
from ponder.llm import LLM
from tests.conftest import decoded_logprobs
from tests.server.conftest import make_tiny_engine

PROMPTS = [[(5 * i + 40) % 250 for i in range(n)] for n in (9, 31, 57)]


def lm_eval_body(model: str, prompts: list[list[int]]) -> dict:
    """What lm-eval's local-completions model sends for loglikelihood requests."""
    return {"model": model, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}


def offline_reference(engine, prompts: list[list[int]]):
    """Per prompt: the completion's text, and its prompt logprobs from the engine offline and from
    decoding it one by one."""
    outs = LLM.from_engine(engine).generate(prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    return [(out.outputs[0].text, [lp.logprob for lp in out.prompt_logprobs[1:]], decoded_logprobs(engine, p))
            for out, p in zip(outs, prompts)]


def check_lm_eval_choice(choice: dict, prompt: list[int], prompt_text: str, reference, texts) -> float:
    """The legacy logprobs as lm-eval reads them; returns the largest difference from the references."""
    completion, *references = reference
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"][:len(prompt)] == [texts(t) for t in prompt]
    assert choice["text"].startswith(prompt_text) and choice["text"] == prompt_text + completion
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(len(lp["tokens"]))]
    for token, chosen, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[token] == chosen and 1 <= len(top) <= 2
    # lm-eval's parse: the sum over the continuation, and whether it is the greedy one
    assert max(lp["top_logprobs"][-1].values()) == lp["token_logprobs"][-1]     # the sampled token is greedy
    return max(abs(a - b) for ref in references for a, b in zip(lp["token_logprobs"][1:len(prompt)], ref))


def test_lm_eval_loglikelihood_request(tiny_server, byte_tokenizer_dir):
    engine = make_tiny_engine(byte_tokenizer_dir, max_model_len=128)
    references = offline_reference(engine, PROMPTS)
    decode = engine.tokenizer.decode
    r = httpx.post(tiny_server.url + "/v1/completions", json=lm_eval_body("tiny", PROMPTS), timeout=60)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    worst = max(check_lm_eval_choice(c, p, decode(p, skip_special_tokens=False), refs,
                                     lambda t: decode([t], skip_special_tokens=False))
                for c, p, refs in zip(choices, PROMPTS, references))
    assert worst < 1e-4
    assert r.json()["usage"]["prompt_tokens"] == sum(map(len, PROMPTS))


def test_echo_streamed_equals_whole(tiny_server):
    body = {"prompt": PROMPTS[1], "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": True,
            "n": 2, "ignore_eos": True}
    whole = httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=60).json()["choices"]
    joined = {0: {"text": "", "token_logprobs": [], "tokens": []}, 1: {"text": "", "token_logprobs": [], "tokens": []}}
    with httpx.stream("POST", tiny_server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    part = joined[c["index"]]
                    if not part["text"]:          # the first chunk of a choice carries the prompt
                        assert len(c["logprobs"]["tokens"]) > len(PROMPTS[1])
                    part["text"] += c["text"]
                    part["token_logprobs"] += c["logprobs"]["token_logprobs"]
                    part["tokens"] += c["logprobs"]["tokens"]
    for c in whole:
        assert joined[c["index"]]["text"] == c["text"]
        assert joined[c["index"]]["tokens"] == c["logprobs"]["tokens"]
        assert joined[c["index"]]["token_logprobs"] == pytest.approx(c["logprobs"]["token_logprobs"])
        assert len(c["logprobs"]["tokens"]) == len(PROMPTS[1]) + 5
    assert whole[0]["logprobs"]["token_logprobs"][:len(PROMPTS[1])] == whole[1]["logprobs"]["token_logprobs"][:len(PROMPTS[1])]


def test_echo_of_a_string_prompt_and_vllm_prompt_logprobs(tiny_server):
    url = tiny_server.url + "/v1/completions"
    plain = httpx.post(url, json={"prompt": "Hello there", "max_tokens": 3, "temperature": 0, "echo": True}).json()
    choice = plain["choices"][0]
    assert choice["text"].startswith("Hello there") and choice["logprobs"] is None
    assert "prompt_logprobs" not in choice
    listed = httpx.post(url, json={"prompt": "Hello there", "max_tokens": 3, "temperature": 0,
                                   "prompt_logprobs": 2}).json()["choices"][0]
    assert listed["text"] == choice["text"][len("Hello there"):]          # no echo asked
    entries = listed["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len("Hello there")
    for token, entry in zip(b"ello there", entries[1:]):
        assert str(token) in entry and 2 <= len(entry) <= 3
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[:2] == [1, 2] and entry[str(token)]["decoded_token"] == chr(token)


@pytest.mark.slow
def test_lm_eval_loglikelihood_request_on_the_default_model(default_llm, request):
    tokenizer = default_llm.engine.tokenizer
    prompts = [tokenizer.encode(t) for t in ("The capital of France is Paris.",
                                              "Water boils at 100 degrees Celsius at sea level, and",
                                              "def add(a, b):\n    return a + b")]
    references = offline_reference(default_llm.engine, prompts)      # before the server takes the engine
    server = request.getfixturevalue("default_server")
    r = httpx.post(server.url + "/v1/completions", json=lm_eval_body("smollm2-135m-instruct", prompts), timeout=120)
    assert r.status_code == 200, r.text
    texts = lambda t: tokenizer.decode([t], skip_special_tokens=False)   # noqa: E731
    worst = max(check_lm_eval_choice(c, p, tokenizer.decode(p, skip_special_tokens=False), refs, texts)
                for c, p, refs in zip(r.json()["choices"], prompts, references))
    assert worst < 1e-4


def test_echo_of_token_ids_outside_the_vocabulary_is_a_400(tiny_server):
    """Found by schemathesis: the ids were decoded for the echo before anything checked them."""
    import httpx

    with httpx.Client(base_url=tiny_server.url, timeout=60) as http:
        r = http.post("/v1/completions", json={"prompt": [26794498, -74, -74, -250974], "echo": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
