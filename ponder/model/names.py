"""Our parameter names and the Hugging Face checkpoint names they come from.

Q/K/V and gate/up are fused into one matrix each (rows stacked in the order listed); every other
parameter maps one to one.
"""

from __future__ import annotations

from ponder.model.config import ModelConfig


def linear_sources(cfg: ModelConfig) -> dict[str, list[str]]:
    """Linear module -> the HF weight matrices stacked into it, [out, in] each."""
    out = {}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        att = src + "self_attn."
        out[dst + "self_attn.qkv_proj"] = [att + "q_proj.weight", att + "k_proj.weight", att + "v_proj.weight"]
        out[dst + "self_attn.o_proj"] = [att + "o_proj.weight"]
        out[dst + "mlp.gate_up_proj"] = [src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"]
        out[dst + "mlp.down_proj"] = [src + "mlp.down_proj.weight"]
    out["lm_head"] = ["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    return out


def other_sources(cfg: ModelConfig) -> dict[str, list[str]]:
    """Every other parameter (norms, biases) -> its HF tensor(s), concatenated when several."""
    out = {"norm.weight": ["model.norm.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        att = src + "self_attn."
        if cfg.qkv_bias:
            out[dst + "self_attn.qkv_proj.bias"] = [att + "q_proj.bias", att + "k_proj.bias", att + "v_proj.bias"]
        if cfg.qk_norm:
            out[dst + "self_attn.q_norm.weight"] = [att + "q_norm.weight"]
            out[dst + "self_attn.k_norm.weight"] = [att + "k_norm.weight"]
        out[dst + "input_layernorm.weight"] = [src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = [src + "post_attention_layernorm.weight"]
    return out
