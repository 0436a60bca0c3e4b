"""The quantized path at model level: requantized loading, bitwise batch invariance of logits,
and (slow) the packaged models against the fp32 path on the same GGUF."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ponder.config import EngineConfig
from ponder.engine.engine import LLMEngine
from ponder.layers import quant_linear
from tests.engine import test_batching

pytestmark = pytest.mark.skipif(not quant_linear.available(), reason="needs a C compiler")

GSM8K = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "gsm8k", "test_dev.jsonl")


@pytest.mark.parametrize("weights", ["q8_0", "q4_0"])
def test_batch_invariance_quantized(make_tiny_engine, weights):
    """Greedy tokens alone, together, chunked and preempted, on the quantized path."""
    test_batching.test_batch_invariance_tiny(lambda **o: make_tiny_engine(weights=weights, **o))


def test_requantized_folder_reports_its_weights(make_tiny_engine):
    q8 = make_tiny_engine(weights="q8_0")
    fp = make_tiny_engine(weights="fp32")
    stats = q8.stats()
    assert stats["weights"] == "q8_0" and stats["kernel"].startswith("int8-")
    assert stats["kv_cache_dtype"] == "fp16" and fp.stats()["kv_cache_dtype"] == "fp32"
    assert stats["weight_bytes"] < fp.stats()["weight_bytes"] / 2.5


def _logits(engine: LLMEngine, chunks: list[tuple[list[int], int, list[int]]], rows: list[int]) -> torch.Tensor:
    return engine.runner.execute(chunks, rows)


def test_logits_are_bitwise_batch_invariant(make_tiny_engine):
    """A token's logits are identical alone, in a batch of 64 decodes, in a prefill chunk, and
    as a decode step: the quantized matmul and the attention both compute per row."""
    engine = make_tiny_engine(weights="q8_0", num_kv_blocks=600, block_size=4)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (int(n),), generator=g).tolist()
            for n in torch.randint(5, 30, (64,), generator=g)]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(64)]
    ours = seqs[0]

    prefill_alone = _logits(engine, [(ours, 0, tables[0])], [0])[0]
    _logits(engine, [(ours[:-1], 0, tables[0])], [0])
    decode_alone = _logits(engine, [(ours[-1:], len(ours) - 1, tables[0])], [0])[0]
    for s, t in zip(seqs[1:], tables[1:]):
        _logits(engine, [(s[:-1], 0, t)], [0])
    decodes = [(s[-1:], len(s) - 1, t) for s, t in zip(seqs, tables)]
    in_batch = _logits(engine, decodes, [0])[0]
    mixed = _logits(engine, [(seqs[1], 0, tables[1]), (ours, 0, tables[0])] + decodes[2:], [1])[0]
    for other in (decode_alone, in_batch, mixed):
        assert torch.equal(prefill_alone, other)


def _real_text(tokenizer, count: int = 4, length: int = 256) -> list[list[int]]:
    if not os.path.exists(GSM8K):
        pytest.skip("shared GSM8K data not present next to this checkout")
    problems = [json.loads(line) for line in open(GSM8K)]
    texts, i = [], 0
    while len(texts) < count:
        text = ""
        while len(tokenizer.encode(text)) < length:
            text += problems[i]["question"] + "\n" + problems[i]["answer"] + "\n\n"
            i += 1
        texts.append(tokenizer.encode(text)[:length])
    return texts


def _all_logits(engine: LLMEngine, tokens: list[int]) -> torch.Tensor:
    """Logits at every position of one sequence, in one forward."""
    table = list(range(-(-len(tokens) // engine.config.block_size)))
    ids, pos, meta, _ = engine.runner.prepare([(tokens, 0, table)])
    with torch.inference_mode():
        model = engine.loaded.model
        return model.compute_logits(model(ids, pos, engine.runner.kv_caches, meta)).double()


# Measured (Intel Xeon, AVX-512 VNNI): SmolLM2 mean KL 0.0028, top-1 97.8%; Qwen 0.5B 0.00048, 98.8%.
@pytest.mark.slow
@pytest.mark.parametrize("model,max_kl,min_top1", [("smollm2-135m-instruct", 0.005, 0.97),
                                                   ("qwen2.5-coder-0.5b-instruct", 0.002, 0.98)])
def test_native_weights_track_fp32(model, max_kl, min_top1):
    make = lambda w: LLMEngine(EngineConfig(model=model, weights=w, num_kv_blocks=32, max_num_seqs=2))
    native, fp32 = make("native"), make("fp32")
    assert native.stats()["weights"] == "native"
    kls, agree = [], []
    for tokens in _real_text(native.tokenizer):
        q, f = _all_logits(native, tokens), _all_logits(fp32, tokens)
        lf, lq = torch.log_softmax(f, -1), torch.log_softmax(q, -1)
        kls.append((lf.exp() * (lf - lq)).sum(-1))
        agree.append((q.argmax(-1) == f.argmax(-1)).double())
    kl, top1 = torch.cat(kls).mean().item(), torch.cat(agree).mean().item()
    assert kl <= max_kl and top1 >= min_top1, f"mean KL {kl:.5f}, top-1 agreement {top1:.4f}"


@pytest.mark.slow
def test_qwen_native_resident_memory():
    """RSS after loading Qwen2.5-Coder-0.5B quantized and one short generation (KV pool small)."""
    script = ("import os; from ponder import LLM, SamplingParams\n"
              "llm = LLM('qwen2.5-coder-0.5b-instruct', num_kv_blocks=64)\n"
              "llm.generate(['def add(a, b):'], SamplingParams(temperature=0, max_tokens=16))\n"
              "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))\n")
    LLMEngine(EngineConfig(model="qwen2.5-coder-0.5b-instruct", num_kv_blocks=4))   # the cache exists
    rss = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
              .stdout.split()[-1])
    assert rss <= 1.0e9, f"RSS {rss / 1e9:.2f} GB"


def test_without_native_kernels_weights_fall_back_to_fp32(monkeypatch, caplog):
    from ponder.model import loader

    monkeypatch.setattr(quant_linear, "available", lambda: False)
    with caplog.at_level("WARNING"):
        assert loader.resolve_weights("native", __file__) == "fp32"
        assert loader.resolve_weights(None, __file__) == "fp32"
    assert "dequantized to fp32" in caplog.text
    monkeypatch.undo()
    assert loader.resolve_weights(None, __file__) == "native"                      # a file: as stored
    assert loader.resolve_weights(None, os.path.dirname(__file__)) == "fp32"       # a folder: its floats
    assert loader.resolve_weights("q4_0", os.path.dirname(__file__)) == "q4_0"


def test_native_stack_equals_the_op_by_op_path(make_tiny_engine):
    """One native call per step gives bit for bit what the model's Python loop gives."""
    engine = make_tiny_engine(weights="q4_0", num_kv_blocks=64, block_size=4)
    runner = engine.runner
    assert runner.native_stack is not None
    chunks = [(list(range(3, 20)), 0, list(range(0, 8))), (list(range(40, 49)), 0, list(range(8, 16)))]
    ids, pos, meta, _ = runner.prepare(chunks)
    with torch.inference_mode():
        python = runner.model(ids, pos, runner.kv_caches, meta)
        native = runner.native_stack.forward(runner.model.embed_tokens(ids), pos, meta)
    assert torch.equal(python, native)


@pytest.mark.slow
def test_batch_invariance_default_model_native():
    """Today's batching test on the packaged GGUF with its weights as stored."""
    def make(**options):
        options = {"num_kv_blocks": 256, "block_size": 4, **options}
        return LLMEngine(EngineConfig(weights="native", **options))

    test_batching.test_batch_invariance_tiny(make)
