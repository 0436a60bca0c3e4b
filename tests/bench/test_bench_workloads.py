"""Workloads: random (fixed and ranged), offline-64, shared-prefix, GSM8K with the chat template."""

import json
import os

import pytest

from ponder.bench.workloads import (DEFAULT_GSM8K_PATH, WorkloadSpec, gsm8k, offline_64, parse_length_range,
                                    random_tokens, resolve_data_path, shared_prefix, warmup)
from ponder.model.tokenizer import Tokenizer


def test_random_tokens_fixed_and_ranged_lengths_are_reproducible():
    fixed = random_tokens(5, 12, 12, 7, vocab_size=50000, seed=1)
    assert [len(p) for p in fixed.prompts] == [12] * 5
    assert fixed.output_tokens == 35 and fixed.prompt_tokens == 60 and fixed.ignore_eos
    ranged = random_tokens(50, 4, 9, 3, vocab_size=300, seed=2)
    assert {len(p) for p in ranged.prompts} <= set(range(4, 10))
    assert all(100 <= t < 300 for p in ranged.prompts for t in p)
    assert random_tokens(50, 4, 9, 3, 300, seed=2).prompts == ranged.prompts
    assert random_tokens(50, 4, 9, 3, 300, seed=3).prompts != ranged.prompts


def test_offline_64_keeps_its_shape():
    w = offline_64(vocab_size=49152)
    assert w.name == "offline-64" and len(w.prompts) == 64 and w.output_len == 128
    assert all(64 <= len(p) <= 256 for p in w.prompts)


def test_shared_prefix_groups_share_exactly_their_prefix():
    w = shared_prefix(num_groups=3, requests_per_group=4, prefix_len=20, suffix_len=5, output_len=2,
                      vocab_size=1000, seed=0)
    assert len(w.prompts) == 12 and all(len(p) == 25 for p in w.prompts)
    prefixes = {tuple(p[:20]) for p in w.prompts}
    assert len(prefixes) == 3
    for prefix in prefixes:
        assert sum(tuple(p[:20]) == prefix for p in w.prompts) == 4
    assert len({tuple(p) for p in w.prompts}) == 12


def test_gsm8k_renders_questions_with_the_chat_template(tmp_path, byte_tokenizer_dir):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"What is {i} + {i}?", "answer": "#### 0"})
                              for i in range(3)) + "\n")
    tok = Tokenizer(byte_tokenizer_dir)
    w = gsm8k(tok, 2, output_len=16, path=str(path))
    assert len(w.prompts) == 2
    text = tok.decode(w.prompts[1], skip_special_tokens=False)
    assert text == "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="3 questions"):
        gsm8k(tok, 5, 16, path=str(path))


def test_default_gsm8k_path_resolves_from_the_repo_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    resolved = resolve_data_path(DEFAULT_GSM8K_PATH)
    if not os.path.exists(resolved):
        pytest.skip("shared GSM8K data not present next to this checkout")
    assert os.path.isabs(resolved)


def test_length_ranges_and_spec_validation():
    assert parse_length_range("128") == (128, 128)
    assert parse_length_range("64:256") == (64, 256)
    for bad in ("0", "9:3", "a:b", "5:"):
        with pytest.raises(ValueError):
            parse_length_range(bad)
    with pytest.raises(ValueError, match="unknown workload"):
        WorkloadSpec(kind="sharegpt")


def test_spec_builds_each_kind():
    spec = WorkloadSpec(kind="shared-prefix", num_requests=6, input_len="4", output_len=3, num_groups=2,
                        prefix_len=10)
    w = spec.build(None, vocab_size=500)
    assert len(w.prompts) == 6 and {len(p) for p in w.prompts} == {14}
    assert WorkloadSpec(kind="random", num_requests=3, input_len="2:5").build(None, 500, seed=1).name == "random"
    assert WorkloadSpec(kind="offline-64").build(None, 500).name == "offline-64"
    assert len(WorkloadSpec(num_requests=3, input_len="5").build(None, 500, num_requests=7).prompts) == 7


def test_warmup_prompt_is_not_a_prefix_of_the_workload():
    w = random_tokens(4, 16, 16, 4, 1000, seed=0)
    prompt = warmup(w).prompts[0]
    assert len(prompt) == 8 and not any(p[:8] == prompt for p in w.prompts)
