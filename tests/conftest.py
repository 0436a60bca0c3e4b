"""Shared fixtures: a tiny random-weight Llama with a byte-level tokenizer (fast, any shape),
and the packaged default model (real weights, loaded once per test session)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ponder.config import EngineConfig
from ponder.engine.engine import LLMEngine
from ponder.llm import LLM
from ponder.model.config import ModelConfig
from ponder.model.llama import LlamaForCausalLM
from ponder.model.loader import LoadedModel
from ponder.model.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_byte_tokenizer(folder: str) -> None:
    """A byte-level BPE tokenizer with no merges: token i < 256 is byte i (GPT-2 byte mapping)."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = sorted(alphabet, key=lambda ch: _gpt2_byte(ch))
    vocab = {ch: i for i, ch in enumerate(byte_to_char)}
    tok = HFTok(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    json.dump({"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHAT_TEMPLATE},
              open(os.path.join(folder, "tokenizer_config.json"), "w"))


def _gpt2_byte(ch: str) -> int:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(cs, bs))[ord(ch)]


def tiny_config(**overrides) -> ModelConfig:
    base = dict(architecture="llama", vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                max_position_embeddings=512, tie_word_embeddings=True, eos_token_ids=[258])
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(cfg: ModelConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg, cfg.max_position_embeddings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.5 if "embed" in name else 0.15)
        if cfg.tie_word_embeddings:
            model.lm_head.weight.copy_(model.embed_tokens.weight.t())
    return model.eval()


def write_hf_folder(model: LlamaForCausalLM, cfg: ModelConfig, folder: str) -> str:
    """`model` as a Hugging Face folder (config.json, model.safetensors under HF names, the byte
    tokenizer), so tests load it through the real loader, quantized or not."""
    from safetensors.torch import save_file

    from ponder.model.names import linear_sources, other_sources

    state = model.state_dict()
    sizes = {"self_attn.qkv_proj": [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2,
             "mlp.gate_up_proj": [cfg.intermediate_size] * 2}
    hf = {"model.embed_tokens.weight": state["embed_tokens.weight"]}
    for module, names in linear_sources(cfg).items():
        if module == "lm_head" and cfg.tie_word_embeddings:
            continue
        rows = state[module + ".weight"].t()
        split = sizes.get(module.split(".", 2)[-1], [rows.shape[0]])
        hf.update(zip(names, rows.split(split)))
    for name, names in other_sources(cfg).items():
        split = sizes["self_attn.qkv_proj"] if "qkv_proj" in name else [len(state[name])]
        hf.update(zip(names, state[name].split(split)))
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, os.path.join(folder, "model.safetensors"))
    json.dump({"model_type": cfg.architecture, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
               "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
               "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
               "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
               "max_position_embeddings": cfg.max_position_embeddings,
               "tie_word_embeddings": cfg.tie_word_embeddings, "eos_token_id": cfg.eos_token_ids},
              open(os.path.join(folder, "config.json"), "w"))
    write_byte_tokenizer(folder)
    return folder


def decoded_logprobs(engine, tokens: list[int]) -> list[float]:
    """The logprob of each token after the first, decoding the tokens one at a time through the
    engine's runner (one-token chunks over the paged KV cache, the decode path)."""
    bs = engine.pool.block_size
    blocks = [engine.pool.allocate() for _ in range(-(-len(tokens) // bs))]
    try:
        out = []
        for j in range(len(tokens) - 1):
            logits = engine.runner.execute([([tokens[j]], j, blocks)], [0])
            out.append(torch.log_softmax(logits.float(), dim=-1)[0, tokens[j + 1]].item())
        return out
    finally:
        engine.pool.release(reversed(blocks))


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("byte_tokenizer"))
    write_byte_tokenizer(folder)
    return folder


@pytest.fixture
def make_tiny_engine(byte_tokenizer_dir, tmp_path_factory):
    """Factory: a real LLMEngine over a tiny random Llama; engine options as keyword arguments."""

    def make(model_overrides: dict | None = None, **options) -> LLMEngine:
        cfg = tiny_config(**(model_overrides or {}))
        options.setdefault("num_kv_blocks", 256)
        options.setdefault("block_size", 4)
        if options.get("weights") in ("q8_0", "q4_0"):   # through the loader: an HF folder, requantized
            folder = write_hf_folder(tiny_model(cfg), cfg, str(tmp_path_factory.mktemp("tiny_hf")))
            return LLMEngine(EngineConfig(model=folder, cache_dir=str(tmp_path_factory.mktemp("cache")), **options))
        loaded = LoadedModel(tiny_model(cfg), cfg, Tokenizer(byte_tokenizer_dir, cfg.eos_token_ids), "tiny")
        return LLMEngine(EngineConfig(model="tiny", **options), loaded=loaded)

    return make


@pytest.fixture(scope="session")
def default_llm() -> LLM:
    """The packaged default model (SmolLM2-135M-Instruct) as users get it (quantized), loaded once."""
    return LLM(num_kv_blocks=1024)


@pytest.fixture(scope="session")
def default_llm_fp32() -> LLM:
    """The default model on the fp32 reference path (dequantized weights, fp32 KV)."""
    return LLM(num_kv_blocks=1024, weights="fp32")


def random_operations(engine, rng, ops: int, new_request, add: float, abort: float, check=None) -> None:
    """Drive `engine` with `ops` random operations — add a request (`new_request(rng)` gives its
    prompt and params) with probability `add`, abort a live one with `abort`, else step — checking
    after each that every block held is in some sequence's table (and `check(engine)`); then run
    it dry."""
    live = []
    for _ in range(ops):
        r = rng.random()
        if r < add:
            live.append(engine.add_request(*new_request(rng)).request_id)
        elif r < add + abort and live:
            engine.abort_request(live.pop(rng.randrange(len(live))))
        else:
            for out in engine.step():
                if out.finished and out.request_id in live:
                    live.remove(out.request_id)
        assert sum(engine.pool.ref_counts) == sum(len(s.block_table) for r in engine.requests.values()
                                                  for s in r.seqs)
        if check is not None:
            check(engine)
    while engine.has_unfinished_requests():
        engine.step()
