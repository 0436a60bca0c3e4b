"""Paged attention on the CPU.

The KV cache of a layer is `[num_blocks, block_size, kv_heads, head_dim]`, fp16 or fp32; a
sequence's block table says which blocks hold its tokens. Two ways to compute a step:

- The native kernel `ponder/kernels/paged_attention.c` takes a list of queries, each with its
  sequence's block table and the number of keys it attends to, and reads K/V straight from the
  blocks: no gather, no padding to the longest context. Every query gets the same arithmetic
  whatever else is in the batch, so a token's output is bitwise the same alone, among many
  decodes or inside a prefill chunk. With an fp16 cache every query of the step (prefill and
  decode) goes through it in one call; with an fp32 cache it runs the decodes.
- Padded groups run as one `scaled_dot_product_attention` call over whole gathered blocks
  (`index_select` of whole blocks copies large contiguous rows; per-slot advanced indexing was
  10x slower): prefill chunks on an fp32 cache, and everything where no C compiler exists.

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
class PagedQueries:
    """Queries for the native kernel: query i attends to the first `context_lens[i]` tokens of
    sequence `seq_index[i]` (causal: its position + 1).

    A token tree's queries attend to their ancestors rather than to whatever precedes them in the
    table: key j >= `tail_from[i]` of query i is table position `tail_positions[i, j - tail_from[i]]`
    (both None when the step has no tree)."""

    rows: torch.Tensor          # [N] rows of the flat token batch
    seq_index: torch.Tensor     # [N] int64 row of `block_tables` each query reads
    block_tables: torch.Tensor  # [S, NB] int64, contiguous
    context_lens: torch.Tensor  # [N] int64
    all_rows: bool              # the queries are every row of the batch, in order
    tail_from: torch.Tensor | None = None        # [N] int64
    tail_positions: torch.Tensor | None = None   # [N, depth] int64, contiguous


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) each token writes
    groups: list[AttentionGroup]
    native: PagedQueries | None = None


@cache
def _kernel(extra_flags: tuple[str, ...] = ()):
    """The kernel, or None without a compiler; `extra_flags` build a variant (tests build the
    AVX2-only one on AVX-512 machines)."""
    lib = kernels.load("paged_attention", extra_flags)
    if lib is None:
        return None
    P, I = kernels.PTR, kernels.I64
    fn = lib.paged_attention
    fn.argtypes, fn.restype = [P, I, P, P, I, P, I, P, P, P, P, I, P, I, I, I, I, I, kernels.F32], ctypes.c_int
    return fn


@cache
def native_attention_supports(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the native kernel exists here and runs this attention shape."""
    if _kernel() is None:
        return False
    supports = kernels.bind("paged_attention", "paged_attention_supports", [kernels.I64] * 3, ctypes.c_int)
    return bool(supports(heads, kv_heads, head_dim))


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the step's keys and values [T, KVH, D] in their cache slots (in the cache's dtype)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D] (rows may be strided); caches [blocks, block_size, KVH, D], this step's keys and
    values already written. Returns [T, H, D]."""
    if meta.native is not None and meta.native.all_rows:
        return native_attention(q, k_cache, v_cache, meta.native, scale)
    if len(meta.groups) == 1 and meta.groups[0].out_index.shape[0] == q.shape[0] == meta.groups[0].query_index.shape[0]:
        return _group_attention(q, k_cache, v_cache, meta.groups[0], scale)   # one group, no reordering
    out = torch.empty_like(q)
    if meta.native is not None:
        out.index_copy_(0, meta.native.rows,
                        native_attention(q.index_select(0, meta.native.rows), k_cache, v_cache, meta.native, scale))
    for group in meta.groups:
        o = _group_attention(q, k_cache, v_cache, group, scale)
        out.index_copy_(0, group.out_index, o.index_select(0, group.out_select))
    return out


def native_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     queries: PagedQueries, scale: float) -> torch.Tensor:
    """The native kernel over float32 q [N, H, D] (heads contiguous, rows may be strided), one row
    per query of `queries`, on an fp16 or fp32 cache; returns [N, H, D]."""
    assert q.dtype == torch.float32 and k_cache.dtype == v_cache.dtype in (torch.float16, torch.float32)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and queries.block_tables.is_contiguous()
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()
    n, heads, dim = q.shape
    out = torch.empty(n, heads, dim)
    tables = queries.block_tables
    tail_from, tail_pos, tail_stride = tail_arguments(queries)
    status = _kernel()(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                       int(k_cache.dtype == torch.float16), tables.data_ptr(), tables.shape[1],
                       queries.seq_index.data_ptr(), queries.context_lens.data_ptr(),
                       tail_from, tail_pos, tail_stride, out.data_ptr(),
                       n, heads, k_cache.shape[2], dim, k_cache.shape[1], scale)
    if status == -1:
        raise ValueError(f"native paged attention does not support heads={heads}, "
                         f"kv_heads={k_cache.shape[2]}, head_dim={dim}")
    if status != 0:
        raise MemoryError("native paged attention could not allocate its work buffers")
    return out


def tail_arguments(queries: PagedQueries) -> tuple[int | None, int | None, int]:
    """The kernel's tree arguments: pointers to tail_from and tail_positions and the latter's row
    stride, or NULLs when no query of the step is a tree's."""
    if queries.tail_from is None:
        return None, None, 0
    assert queries.tail_positions.is_contiguous() and queries.tail_from.dtype == torch.int64
    return queries.tail_from.data_ptr(), queries.tail_positions.data_ptr(), queries.tail_positions.shape[1]


def _group_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     group: AttentionGroup, scale: float) -> torch.Tensor:
    """Attention for one padded group; returns [B * Lq, H, D] in query-grid order."""
    b, _, lq, c = group.mask.shape
    heads, dim = q.shape[1], q.shape[2]
    qg = q.index_select(0, group.query_index).view(b, lq, heads, dim).transpose(1, 2)
    kv_heads = k_cache.shape[2]
    # An fp16 cache is widened to q's dtype after the gather (only the blocks read are converted).
    kg = k_cache.index_select(0, group.block_tables).to(q.dtype).view(b, c, kv_heads, dim).transpose(1, 2)
    vg = v_cache.index_select(0, group.block_tables).to(q.dtype).view(b, c, kv_heads, dim).transpose(1, 2)
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=group.mask, scale=scale,
                                       enable_gqa=heads != kv_heads)
    return o.transpose(1, 2).reshape(b * lq, heads, dim)
