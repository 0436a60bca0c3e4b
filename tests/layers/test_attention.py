"""The native paged-attention kernel against a float64 reference and the padded SDPA path, and its
batch invariance: a query's output is bitwise the same whatever else is in the call."""

import pytest
import torch

from ponder.layers import attention
from ponder.layers.attention import (AttentionGroup, PagedQueries, _group_attention, native_attention,
                                     native_attention_supports)

pytestmark = pytest.mark.skipif(not native_attention_supports(1, 1, 64), reason="no C compiler for the native kernel")

CHUNK = 256   # the kernel's split size (paged_attention.c): contexts below, at and above it are tested


def _paged_cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen):
    k, v = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    return k.to(dtype), v.to(dtype)


def _tables(num_seqs, blocks_each, num_blocks, gen):
    return torch.randperm(num_blocks, generator=gen)[:num_seqs * blocks_each].view(num_seqs, blocks_each).contiguous()


def _queries(seq_index, tables, context):
    return PagedQueries(torch.arange(len(context)), seq_index, tables, context, True)


def _reference(q, k_cache, v_cache, queries, scale):
    """float64 attention of each query over its sequence's first n keys (fp16 caches dequantized)."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    out = []
    for i, n in enumerate(queries.context_lens.tolist()):
        blocks = queries.block_tables[queries.seq_index[i]]
        k = k_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(heads // kv_heads, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(heads // kv_heads, dim=1)
        p = ((k * q[i].double()).sum(-1) * scale).softmax(0)          # [n, H]
        out.append((p[:, :, None] * v).sum(0))
    return torch.stack(out).float()


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim,kv_heads,group", [(64, 3, 3), (64, 2, 7), (128, 2, 1), (128, 1, 3), (80, 2, 2),
                                                     (16, 2, 2), (256, 1, 2)])
def test_native_matches_float64_reference(kv_dtype, head_dim, kv_heads, group):
    gen = torch.Generator().manual_seed(head_dim * 100 + kv_heads * 10 + group)
    block_size, blocks_each = 16, 50
    k_cache, v_cache = _paged_cache(160, block_size, kv_heads, head_dim, kv_dtype, gen)
    tables = _tables(3, blocks_each, 160, gen)
    # Block edges (16, 17), chunk edges (255-257, 512, 513), a context of one key and one of 3 chunks.
    context = torch.tensor([1, 2, 16, 17, 100, 255, 256, 257, 512, 513, 700, 31])
    seq_index = torch.arange(len(context)) % 3
    q = torch.randn(len(context), kv_heads * group, head_dim, generator=gen)
    queries = _queries(seq_index, tables, context)
    scale = head_dim ** -0.5
    out = native_attention(q, k_cache, v_cache, queries, scale)
    torch.testing.assert_close(out, _reference(q, k_cache, v_cache, queries, scale), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
def test_avx2_build_matches_the_reference(kv_dtype, monkeypatch):
    """The kernel built without AVX-512 (what an AVX2-only CPU runs) is right too."""
    avx2 = attention._kernel(("-mno-avx512f",))
    assert avx2 is not None
    monkeypatch.setattr(attention, "_kernel", lambda: avx2)
    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache = _paged_cache(120, 8, 2, 64, kv_dtype, gen)
    tables = _tables(2, 60, 120, gen)
    context = torch.tensor([1, 9, 256, 300, 480])
    q = torch.randn(len(context), 6, 64, generator=gen)
    queries = _queries(torch.tensor([0, 1, 0, 1, 0]), tables, context)
    out = native_attention(q, k_cache, v_cache, queries, 0.125)
    torch.testing.assert_close(out, _reference(q, k_cache, v_cache, queries, 0.125), atol=2e-6, rtol=1e-5)


def test_native_fp32_decode_matches_padded_sdpa():
    """The fp32 path's two backends (native decodes, SDPA prefill) agree on the same queries."""
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 8
    context = torch.tensor([1, 2, block_size, block_size + 1, 37, 100, 3, 64, 65, 5, 300])
    batch, nb = len(context), int(-(-context.max() // block_size))
    k_cache, v_cache = _paged_cache(batch * nb + 20, block_size, kv_heads, head_dim, torch.float32, gen)
    tables = _tables(batch, nb, batch * nb + 20, gen)
    q = torch.randn(batch, heads, head_dim, generator=gen)
    native = native_attention(q, k_cache, v_cache, _queries(torch.arange(batch), tables, context), 0.125)
    key_pos = torch.arange(nb * block_size)
    padded = AttentionGroup(query_index=torch.arange(batch), block_tables=tables.reshape(-1),
                            mask=(key_pos[None, :] < context[:, None])[:, None, None, :],
                            out_index=torch.arange(batch), out_select=torch.arange(batch))
    torch.testing.assert_close(native, _group_attention(q, k_cache, v_cache, padded, 0.125), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_output_does_not_depend_on_the_batch(kv_dtype, head_dim):
    """One query (700 keys: three chunks) computed alone on one thread, among 64 decodes of other
    sequences, and as the last token of a 40-token prefill chunk of its own sequence: torch.equal."""
    gen = torch.Generator().manual_seed(head_dim)
    heads, kv_heads, block_size, blocks_each, n = 9, 3, 16, 48, 700
    k_cache, v_cache = _paged_cache(65 * blocks_each, block_size, kv_heads, head_dim, kv_dtype, gen)
    tables = _tables(65, blocks_each, 65 * blocks_each, gen)
    target = torch.randn(1, heads, head_dim, generator=gen)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = native_attention(target, k_cache, v_cache, _queries(torch.tensor([0]), tables, torch.tensor([n])), 0.1)
    finally:
        torch.set_num_threads(threads)

    others = torch.randn(64, heads, head_dim, generator=gen)
    decodes = torch.cat([others[:30], target, others[30:]])          # the target is row 30, sequence 0
    seq_index = torch.cat([torch.arange(1, 31), torch.tensor([0]), torch.arange(31, 65)])
    context = torch.randint(1, blocks_each * block_size, (65,), generator=gen)
    context[30] = n
    among_decodes = native_attention(decodes, k_cache, v_cache, _queries(seq_index, tables, context), 0.1)

    chunk = torch.cat([torch.randn(39, heads, head_dim, generator=gen), target])   # positions n-40 .. n-1
    in_prefill = native_attention(chunk, k_cache, v_cache,
                                  _queries(torch.zeros(40, dtype=torch.long), tables, torch.arange(n - 39, n + 1)), 0.1)

    assert torch.equal(among_decodes[30], alone[0])
    assert torch.equal(in_prefill[-1], alone[0])


def test_strided_query_rows_are_read_in_place():
    """Queries may be a view into the fused qkv rows (the row stride is not H * D)."""
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = _paged_cache(20, 4, 2, 64, torch.float16, gen)
    tables = _tables(2, 10, 20, gen)
    qkv = torch.randn(3, 8, 64, generator=gen)                      # 4 query heads, then K and V
    queries = _queries(torch.tensor([0, 1, 1]), tables, torch.tensor([5, 40, 9]))
    strided = native_attention(qkv[:, :4], k_cache, v_cache, queries, 0.125)
    assert torch.equal(strided, native_attention(qkv[:, :4].contiguous(), k_cache, v_cache, queries, 0.125))


def test_unsupported_shapes_are_reported():
    assert native_attention_supports(9, 3, 64) and native_attention_supports(64, 1, 256)
    assert not native_attention_supports(9, 2, 64)       # heads not a multiple of kv heads
    assert not native_attention_supports(65, 1, 64)      # group above 64
    assert not native_attention_supports(4, 2, 12)       # head_dim not a multiple of 8
    assert not native_attention_supports(4, 2, 264)      # head_dim above 256
