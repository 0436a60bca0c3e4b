"""Paged attention on the CPU.

The KV cache of a layer is `[num_blocks, block_size, kv_heads, head_dim]`; a sequence's block
table says which blocks hold its tokens. A step's batch is split into decodes (one query each)
and prefill chunks (many queries each, possibly on top of a cached prefix):

- Decodes run in the native kernel `ponder/kernels/paged_attention.c`, which reads each
  sequence's K/V straight from its blocks: no gather, no padding to the longest context. Where no
  C compiler exists they fall back to the padded path below.
- Prefill chunks are padded into one group and run as one `scaled_dot_product_attention` call
  over whole gathered blocks (`index_select` of whole blocks copies large contiguous rows;
  per-slot advanced indexing was 10x slower).

Either way there is no Python loop over sequences on the hot path.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from ponder import kernels


@dataclass
class AttentionGroup:
    """Sequences whose queries are padded to a common length `Lq` and contexts to `C` (whole blocks)."""

    query_index: torch.Tensor   # [B * Lq] rows of the flat token batch (padding repeats a valid row)
    block_tables: torch.Tensor  # [B * NB] blocks of each sequence's context (padding: block 0)
    mask: torch.Tensor          # [B, 1, Lq, C = NB * block_size] True where a query may attend to a key
    out_index: torch.Tensor     # [N] flat token rows that the valid queries write back to
    out_select: torch.Tensor    # [N] positions in the [B * Lq] query grid of those rows


@dataclass
class DecodeBatch:
    """Decode rows for the native kernel: one query per sequence, unpadded contexts."""

    rows: torch.Tensor          # [B] rows of the flat token batch
    block_tables: torch.Tensor  # [B, NB] int64, contiguous
    context_lens: torch.Tensor  # [B] int64 tokens each query attends to (itself included)
    all_rows: bool              # the step is decodes only, in row order


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) each token writes
    groups: list[AttentionGroup]
    decode: DecodeBatch | None = None


@cache
def _native_decode():
    P, I = kernels.PTR, kernels.I64
    return kernels.bind("paged_attention", "paged_decode_attention",
                        [P, I, P, P, P, I, P, P, I, I, I, I, I, kernels.F32], ctypes.c_int)


def native_decode_available() -> bool:
    return _native_decode() is not None


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the step's keys and values [T, KVH, D] in their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D] (rows may be strided); caches [blocks, block_size, KVH, D], this step's keys and
    values already written. Returns [T, H, D]."""
    if meta.decode is not None and meta.decode.all_rows:
        return decode_attention(q, k_cache, v_cache, meta.decode, scale)
    if len(meta.groups) == 1 and meta.groups[0].out_index.shape[0] == q.shape[0] == meta.groups[0].query_index.shape[0]:
        return _group_attention(q, k_cache, v_cache, meta.groups[0], scale)   # one group, no reordering
    out = torch.empty_like(q)
    if meta.decode is not None:
        out.index_copy_(0, meta.decode.rows,
                        decode_attention(q.index_select(0, meta.decode.rows), k_cache, v_cache, meta.decode, scale))
    for group in meta.groups:
        o = _group_attention(q, k_cache, v_cache, group, scale)
        out.index_copy_(0, group.out_index, o.index_select(0, group.out_select))
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     decode: DecodeBatch, scale: float) -> torch.Tensor:
    """The native kernel over q [B, H, D] (heads contiguous, rows may be strided); returns [B, H, D]."""
    assert q.dtype == torch.float32 and k_cache.is_contiguous() and v_cache.is_contiguous()
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()
    b, heads, dim = q.shape
    out = torch.empty(b, heads, dim)
    tables = decode.block_tables
    status = _native_decode()(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                              tables.shape[1], decode.context_lens.data_ptr(), out.data_ptr(),
                              b, heads, k_cache.shape[2], dim, k_cache.shape[1], scale)
    if status != 0:
        raise ValueError(f"native decode attention does not support heads={heads}, "
                         f"kv_heads={k_cache.shape[2]}, head_dim={dim}")
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
