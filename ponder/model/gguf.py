"""GGUF files: metadata -> ModelConfig, tensors -> HF-named float tensors, tokenizer export.

Built on the `gguf` package's reader; dequantization is ours (`dequant.py`, vectorized torch).
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from ponder.model.config import ModelConfig
from ponder.model.dequant import dequantize

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Stop tokens of the chat templates of the families we run, added to the file's eos id.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")


def read_reader(path: str):
    import gguf

    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return gguf.GGUFReader(path)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "qwen3", "mistral"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}; ponder runs llama, mistral, qwen2, qwen3")

    def meta(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    names = {t.name for t in reader.tensors}
    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens", [])
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos)] if eos is not None else []
    token_index = {tok: i for i, tok in enumerate(tokens)} if tokens else {}
    for tok in _END_OF_TURN_TOKENS:
        if tok in token_index and token_index[tok] not in eos_ids:
            eos_ids.append(token_index[tok])
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(meta("vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=int(meta("attention.key_length", hidden // heads)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(meta("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_ids,
        name=str(_field(reader, "general.name", "")),
        recommended_sampling=_recommended_sampling(reader),
    )


# GGUF's general.sampling.* keys (written by convert_hf_to_gguf from generation_config.json)
_SAMPLING_KEYS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                  "penalty_repeat": "repetition_penalty"}


def _recommended_sampling(reader) -> dict:
    found = {name: _field(reader, f"general.sampling.{key}") for key, name in _SAMPLING_KEYS.items()}
    return {name: (int(v) if name == "top_k" else float(v)) for name, v in found.items() if v is not None}


def gguf_hf_tensors(reader, cfg: ModelConfig, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """All weights dequantized to `dtype`, under Hugging Face parameter names."""
    out = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[name] = _rope_order(dequantize(np.asarray(t.data), t.tensor_type, shape, dtype), name, cfg)
    return out


def gguf_sources(reader, cfg: ModelConfig):
    """The file's matrices as stored (bytes in their block format, F32/F16/BF16 as floats) and
    its other tensors as float32, under Hugging Face names — for the quantized path."""
    from ponder.model.quantized import Source

    matrices, others = {}, {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if len(shape) == 1:
            others[name] = _rope_order(dequantize(np.asarray(t.data), t.tensor_type, shape), name, cfg)
            continue
        if t.tensor_type in (QT.F32, QT.F16, QT.BF16):
            src = Source(*shape, floats=dequantize(np.asarray(t.data), t.tensor_type, shape))
        else:
            src = Source(*shape, QT(t.tensor_type), np.asarray(t.data).reshape(shape[0], -1))
        rows = torch.arange(shape[0])
        order = _rope_order(rows, name, cfg)
        matrices[name] = src if order is rows else src.permute_rows(order.numpy())
    return matrices, others


def _rope_order(w: torch.Tensor, name: str, cfg: ModelConfig) -> torch.Tensor:
    """llama.cpp stores Q/K rows of llama/mistral interleaved for its rotary kernel; undo it for
    rotate-half (on a weight, a bias, or a row index)."""
    if cfg.architecture in ("llama", "mistral"):
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            return _unpermute_rope(w, cfg.num_heads)
        if name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            return _unpermute_rope(w, cfg.num_kv_heads)
    return w


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    rest = w.shape[1:]
    return (w.reshape(n_head, rows // n_head // 2, 2, *rest)
            .transpose(1, 2).reshape(rows, *rest).contiguous())


def export_tokenizer(path: str, out_dir: str) -> None:
    """Write tokenizer.json + tokenizer_config.json (with the chat template) built from GGUF metadata.

    `transformers` does the GGUF vocabulary -> `tokenizers` conversion (first load only).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                        gguf_file=os.path.basename(path))
    tok.save_pretrained(out_dir)
