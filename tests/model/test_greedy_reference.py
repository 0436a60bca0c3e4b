"""Greedy exactness: ponder's greedy tokens equal transformers' on the same GGUF weights.

The references are committed (tests/reference/greedy_*.json); `make_reference.py` regenerates
them with transformers, and the SmolLM2 one is regenerated live here too, so the file cannot
drift from what transformers actually does.
"""

import json

import pytest

from ponder import LLM, SamplingParams

from tests.reference.make_reference import PROMPTS, SETTINGS, hf_greedy, reference_path

pytestmark = pytest.mark.slow


def _reference(model):
    return json.load(open(reference_path(model)))


def _ponder_greedy(llm, ref):
    params = SamplingParams(temperature=0, max_tokens=ref["max_new_tokens"], ignore_eos=True)
    outs = llm.generate(ref["prompt_token_ids"], params)
    return [o.outputs[0].token_ids for o in outs]


def test_smollm2_greedy_matches_transformers(default_llm_fp32):
    """The fp32 reference path (weights="fp32") keeps its token-for-token equality."""
    ref = _reference("smollm2-135m-instruct")
    assert len(ref["prompt_token_ids"]) >= 8 and ref["max_new_tokens"] >= 64
    assert _ponder_greedy(default_llm_fp32, ref) == ref["hf_greedy_token_ids"]


def test_smollm2_reference_file_is_what_transformers_says(default_llm):
    ref = _reference("smollm2-135m-instruct")
    live = hf_greedy(default_llm.engine.loaded.path, ref["prompt_token_ids"][:2], 16)
    assert live == [t[:16] for t in ref["hf_greedy_token_ids"][:2]]


def test_qwen_greedy_matches_transformers():
    ref = _reference("qwen2.5-coder-0.5b-instruct")
    assert len(ref["prompt_token_ids"]) >= 4 and ref["max_new_tokens"] >= 32
    llm = LLM("qwen2.5-coder-0.5b-instruct", num_kv_blocks=64, weights="fp32")
    assert _ponder_greedy(llm, ref) == ref["hf_greedy_token_ids"]


def test_prompts_tokenize_like_transformers(default_llm):
    from transformers import AutoTokenizer
    import os

    path = default_llm.engine.loaded.path
    hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in PROMPTS + ["naïve café — 日本語 🙂", "  spaces\n\n\ttabs"]:
        assert default_llm.tokenizer.encode(text) == hf.encode(text)
        assert default_llm.tokenizer.decode(hf.encode(text)) == text
    assert SETTINGS["smollm2-135m-instruct"][1] == 64


def test_pure_pytorch_path_matches_transformers_too():
    """With the native kernels off (no C compiler, or PONDER_NATIVE_KERNELS=0) every op runs in
    PyTorch; that path must give the same greedy tokens. A subprocess, since kernels load once."""
    import os
    import subprocess
    import sys

    ref = _reference("smollm2-135m-instruct")
    script = ("import json, sys\n"
              "from ponder import LLM, SamplingParams, kernels\n"
              "from ponder.layers import fused\n"
              "assert kernels.load('paged_attention') is None and fused._ops() is None\n"
              "ref = json.load(open(sys.argv[1]))\n"
              "llm = LLM()\n"
              "assert not llm.engine.runner.native_attention\n"
              "outs = llm.generate(ref['prompt_token_ids'][:4], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))\n"
              "print(json.dumps([o.outputs[0].token_ids for o in outs]))\n")
    env = {**os.environ, "PONDER_NATIVE_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", script, reference_path("smollm2-135m-instruct")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    tokens = json.loads(done.stdout.strip().splitlines()[-1])
    assert tokens == [t[:32] for t in ref["hf_greedy_token_ids"][:4]]
