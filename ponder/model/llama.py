"""The Llama family (Llama 2/3, Mistral, SmolLM2, Qwen2/2.5, Qwen3) in plain PyTorch.

Tokens of all sequences in a step come in as one flat batch; attention reads and writes the
paged KV cache through `AttentionMetadata`. Q/K/V and gate/up projections are fused into one
matmul each (fewer, larger GEMMs are what a CPU runs fast), stored [in, out]. Between the matmuls,
the residual add + norm, the rotary embedding + cache write, and SiLU * up are one fused op each
(`ponder/layers/fused.py`); the residual stream is updated in place, as in vLLM.
"""

from __future__ import annotations

import torch
from torch import nn

from ponder.layers.attention import AttentionMetadata, paged_attention
from ponder.layers.fused import rope_and_cache, silu_and_mul
from ponder.layers.linear import Linear
from ponder.layers.norm import RMSNorm
from ponder.layers.rotary import RotaryEmbedding
from ponder.model.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x, rope: RotaryEmbedding, positions, kv_cache, meta: AttentionMetadata):
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x)
        if self.q_norm is not None:
            by_head = qkv.view(-1, heads + 2 * kv_heads, self.head_dim)
            by_head[:, :heads] = self.q_norm(by_head[:, :heads])
            by_head[:, heads:heads + kv_heads] = self.k_norm(by_head[:, heads:heads + kv_heads])
        q = rope_and_cache(qkv, heads, kv_heads, positions, rope, meta.slot_mapping, kv_cache[0], kv_cache[1])
        o = paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, residual, normed, rope, positions, kv_cache, meta):
        """normed = input_layernorm(residual), computed by the caller (fused with the previous
        layer's residual add). Adds the attention output to `residual` in place; returns the MLP
        output, for the caller to add."""
        attn = self.self_attn(normed, rope, positions, kv_cache, meta)
        return self.mlp(self.post_attention_layernorm.add_and_norm(residual, attn))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.config = cfg
        # An uninitialised weight (the checkpoint's replaces it): nn.Embedding's default normal_()
        # init costs 1.8 s on the default model, most of it importing torch._dynamo.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied models get a transposed copy of the embedding as lm_head (see layers/linear.py).
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] for a flat batch of T tokens."""
        residual = self.embed_tokens(input_ids)
        normed = self.layers[0].input_layernorm(residual)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            mlp_out = layer(residual, normed, self.rope, positions, kv_cache, meta)
            if i + 1 < len(self.layers):
                normed = self.layers[i + 1].input_layernorm.add_and_norm(residual, mlp_out)
            else:
                residual.add_(mlp_out)
        return residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits only for the rows given (the last token of each sampled sequence)."""
        return self.lm_head(self.norm(hidden))
