"""Regenerate the greedy reference tokens with `transformers` on the same GGUF weights.

    .venv/bin/python tests/reference/make_reference.py [smollm2-135m-instruct|qwen2.5-coder-0.5b-instruct ...]

Writes tests/reference/greedy_<model>.json: prompt token ids and transformers' greedy tokens
(EOS not special: generation runs the full length), which tests/model/test_greedy_reference.py
compares ponder against token for token.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "Q: What is 17 times 23?\nA:",
    "The three laws of thermodynamics are",
    "import numpy as np\n\n# Compute the mean of a list\n",
    "Photosynthesis converts sunlight into",
    "Here is a short poem about autumn:\n",
]
SETTINGS = {"smollm2-135m-instruct": (8, 64), "qwen2.5-coder-0.5b-instruct": (4, 32)}


def reference_path(model: str) -> str:
    return os.path.join(HERE, f"greedy_{model}.json")


def hf_greedy(gguf_path: str, prompts_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                              dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    out = []
    for ids in prompts_ids:
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
        out.append(gen[0, len(ids):].tolist())
    return out


def make(model: str) -> dict:
    from ponder.config import EngineConfig
    from ponder.model.loader import resolve_model_path
    from ponder.model.tokenizer import Tokenizer  # noqa: F401  (ensures the package imports)
    from ponder.engine.engine import LLMEngine

    num_prompts, max_new = SETTINGS[model]
    engine = LLMEngine(EngineConfig(model=model, num_kv_blocks=64))
    prompts_ids = [engine.tokenizer.encode(p) for p in PROMPTS[:num_prompts]]
    path = resolve_model_path(model, engine.config.cache_dir)
    data = {"model": model, "max_new_tokens": max_new, "prompt_token_ids": prompts_ids,
            "hf_greedy_token_ids": hf_greedy(path, prompts_ids, max_new)}
    with open(reference_path(model), "w") as f:
        json.dump(data, f)
    return data


if __name__ == "__main__":
    for name in sys.argv[1:] or list(SETTINGS):
        make(name)
        print("wrote", reference_path(name))
