"""Paged attention in plain PyTorch.

The KV cache of a layer is `[num_blocks, block_size, kv_heads, head_dim]`; a sequence's block
table says which blocks hold its tokens. A step's batch is split into at most two padded groups —
decodes (one query each) and prefill chunks (many queries each, possibly on top of a cached
prefix) — and each group runs as one `scaled_dot_product_attention` call over whole gathered
blocks, so there is no Python loop over sequences on the hot path. Gathering whole blocks with
`index_select` copies large contiguous rows; per-slot advanced indexing was 10x slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Sequences whose queries are padded to a common length `Lq` and contexts to `C` (whole blocks)."""

    query_index: torch.Tensor   # [B * Lq] rows of the flat token batch (padding repeats a valid row)
    block_tables: torch.Tensor  # [B * NB] blocks of each sequence's context (padding: block 0)
    mask: torch.Tensor          # [B, 1, Lq, C = NB * block_size] True where a query may attend to a key
    out_index: torch.Tensor     # [N] flat token rows that the valid queries write back to
    out_select: torch.Tensor    # [N] positions in the [B * Lq] query grid of those rows


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) each token writes
    groups: list[AttentionGroup]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; caches: [blocks, block_size, KVH, D]. Returns [T, H, D]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, meta.slot_mapping, v)
    if len(meta.groups) == 1 and meta.groups[0].out_index.shape[0] == q.shape[0] == meta.groups[0].query_index.shape[0]:
        return _group_attention(q, k_cache, v_cache, meta.groups[0], scale)   # all decodes: no reordering
    out = torch.empty_like(q)
    for group in meta.groups:
        o = _group_attention(q, k_cache, v_cache, group, scale)
        out.index_copy_(0, group.out_index, o.index_select(0, group.out_select))
    return out


def _group_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     group: AttentionGroup, scale: float) -> torch.Tensor:
    """Attention for one padded group; returns [B * Lq, H, D] in query-grid order."""
    b, _, lq, c = group.mask.shape
    heads, dim = q.shape[1], q.shape[2]
    qg = q.index_select(0, group.query_index).view(b, lq, heads, dim).transpose(1, 2)
    kv_heads = k_cache.shape[2]
    kg = k_cache.index_select(0, group.block_tables).view(b, c, kv_heads, dim).transpose(1, 2)
    vg = v_cache.index_select(0, group.block_tables).view(b, c, kv_heads, dim).transpose(1, 2)
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=group.mask, scale=scale,
                                       enable_gqa=heads != kv_heads)
    return o.transpose(1, 2).reshape(b * lq, heads, dim)
