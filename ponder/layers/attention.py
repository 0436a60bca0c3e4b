"""Paged attention in plain PyTorch.

The KV cache of a layer is a flat tensor of slots `[num_blocks * block_size, kv_heads, head_dim]`;
a sequence's block table says which slots hold its tokens. A step's batch is split into at most
two padded groups — decodes (one query each) and prefill chunks (many queries each, possibly on
top of a cached prefix) — and each group runs as one `scaled_dot_product_attention` call, so there
is no Python loop over sequences on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Sequences whose queries are padded to a common length `Lq` and keys to a common `C`."""

    query_index: torch.Tensor   # [B, Lq] rows of the flat token batch (padding repeats a valid row)
    kv_slots: torch.Tensor      # [B, C] cache slots of each sequence's context (padding: slot 0)
    mask: torch.Tensor          # [B, 1, Lq, C] True where a query may attend to a key
    out_index: torch.Tensor     # [N] flat token rows that the valid queries write back to
    out_select: torch.Tensor    # [N] positions in the flattened [B * Lq] query grid of those rows


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot that each token of the batch writes
    groups: list[AttentionGroup]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; caches: [slots, KVH, D]. Returns [T, H, D]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    for group in meta.groups:
        o = _group_attention(q, k_cache, v_cache, group, scale)
        out.index_copy_(0, group.out_index, o.index_select(0, group.out_select))
    return out


def _group_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     group: AttentionGroup, scale: float) -> torch.Tensor:
    """Attention for one padded group; returns [B * Lq, H, D] in query-grid order."""
    b, lq = group.query_index.shape
    qg = q[group.query_index].transpose(1, 2)                  # [B, H, Lq, D]
    kg = k_cache[group.kv_slots].transpose(1, 2)               # [B, KVH, C, D]
    vg = v_cache[group.kv_slots].transpose(1, 2)
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=group.mask, scale=scale,
                                       enable_gqa=qg.shape[1] != kg.shape[1])
    return o.transpose(1, 2).reshape(b * lq, q.shape[1], q.shape[2])
