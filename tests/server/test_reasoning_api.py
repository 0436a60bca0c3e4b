"""Reasoning models: the `<think>` block of the answer goes to reasoning_content, streamed as its
own delta; chat_template_kwargs reach the template (enable_thinking)."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from ponder.config import EngineConfig
from ponder.engine.engine import LLMEngine
from ponder.model.loader import LoadedModel
from ponder.model.tokenizer import Tokenizer
from tests.conftest import tiny_config, tiny_model, write_byte_tokenizer
from tests.server.conftest import ServerThread

# A Qwen3-like template: the answer may open with a think block; enable_thinking=false closes an
# empty one in the prompt; "opened" starts the answer inside one (as DeepSeek-R1's template does).
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% elif opened is defined and opened %}<think>\n{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("think_tok"))
    write_byte_tokenizer(folder)
    config = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    json.dump({**config, "chat_template": THINK_TEMPLATE}, open(os.path.join(folder, "tokenizer_config.json"), "w"))
    cfg = tiny_config()
    loaded = LoadedModel(tiny_model(cfg), cfg, Tokenizer(folder, cfg.eos_token_ids), "tiny")
    server = ServerThread(LLMEngine(EngineConfig(model="tiny", num_kv_blocks=256, block_size=4), loaded=loaded))
    yield server
    server.stop()


def _post(server, body):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r


BASE = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "temperature": 1.0, "seed": 3}


@pytest.mark.parametrize("regex, kwargs, reasoning, content", [
    ("<think>\nabc\n</think>\n\nxy", {}, "\nabc\n", "xy"),
    ("abc</think>xy", {"opened": True}, "abc", "xy"),
    ("xy", {"enable_thinking": False}, None, "xy"),
])
def test_reasoning_is_split_from_content_whole_and_streamed(thinking_server, regex, kwargs, reasoning, content):
    body = {**BASE, "guided_regex": regex, "chat_template_kwargs": kwargs}
    message = _post(thinking_server, body).json()["choices"][0]["message"]
    assert message.get("reasoning_content") == reasoning and message["content"] == content
    events = _post(thinking_server, {**body, "stream": True}).text.split("\n\n")
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in events if e.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == (reasoning or "")
    assert "".join(d.get("content", "") for d in deltas) == content
    kinds = [k for d in deltas for k in ("reasoning_content", "content") if d.get(k)]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning_content")   # all reasoning before any content
