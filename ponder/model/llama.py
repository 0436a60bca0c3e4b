"""The Llama family (Llama 2/3, Mistral, SmolLM2, Qwen2/2.5, Qwen3) in plain PyTorch.

Tokens of all sequences in a step come in as one flat batch; attention reads and writes the
paged KV cache through `AttentionMetadata`. Q/K/V and gate/up projections are fused into one
matmul each (fewer, larger GEMMs are what a CPU runs fast), stored [in, out].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ponder.layers.attention import AttentionMetadata, paged_attention
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

    def forward(self, x, rope: RotaryEmbedding, rope_tables, kv_cache, meta: AttentionMetadata):
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(-1, heads + 2 * kv_heads, self.head_dim)
        v = qkv[:, heads + kv_heads:]
        if self.q_norm is None:
            qk = rope.apply(qkv[:, :heads + kv_heads], rope_tables)   # q and k rotated in one pass
        else:
            qk = torch.cat((self.q_norm(qkv[:, :heads]), self.k_norm(qkv[:, heads:heads + kv_heads])), dim=1)
            qk = rope.apply(qk, rope_tables)
        o = paged_attention(qk[:, :heads], qk[:, heads:], v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, rope_tables, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), rope, rope_tables, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied models get a transposed copy of the embedding as lm_head (see layers/linear.py).
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] for a flat batch of T tokens."""
        x = self.embed_tokens(input_ids)
        rope_tables = self.rope.tables(positions)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, self.rope, rope_tables, kv_cache, meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits only for the rows given (the last token of each sampled sequence)."""
        return self.lm_head(self.norm(hidden))
