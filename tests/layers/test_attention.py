"""The native decode-attention kernel against the padded SDPA path, on random paged caches."""

import pytest
import torch

from ponder.layers.attention import (AttentionGroup, DecodeBatch, _group_attention, decode_attention,
                                     native_decode_available)

pytestmark = pytest.mark.skipif(not native_decode_available(), reason="no C compiler for the native kernel")


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (14, 2, 64, 16),
                                                                (8, 8, 128, 8), (6, 2, 80, 4)])
def test_native_decode_matches_padded_sdpa(heads, kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim)
    num_blocks, batch = 400, 11
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    context = torch.tensor([1, 2, block_size, block_size + 1, 37, 100, 3, 64, 65, 5, 90])
    nb = int(-(-context.max() // block_size))
    tables = torch.randperm(num_blocks, generator=gen)[:batch * nb].view(batch, nb).contiguous()
    q = torch.randn(batch, heads, head_dim, generator=gen)
    scale = head_dim ** -0.5

    native = decode_attention(q, k_cache, v_cache, DecodeBatch(torch.arange(batch), tables, context, True), scale)

    key_pos = torch.arange(nb * block_size)
    padded = AttentionGroup(query_index=torch.arange(batch), block_tables=tables.reshape(-1),
                            mask=(key_pos[None, :] < context[:, None])[:, None, None, :],
                            out_index=torch.arange(batch), out_select=torch.arange(batch))
    reference = _group_attention(q, k_cache, v_cache, padded, scale)
    torch.testing.assert_close(native, reference, atol=2e-6, rtol=1e-5)


def test_native_decode_result_does_not_depend_on_batch():
    """A sequence's output is bitwise the same alone or among others (batch invariance)."""
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache = torch.randn(2, 64, 16, 3, 64, generator=gen)
    tables = torch.randperm(64, generator=gen)[:40].view(5, 8).contiguous()
    context = torch.tensor([120, 7, 128, 33, 90])
    q = torch.randn(5, 9, 64, generator=gen)
    together = decode_attention(q, k_cache, v_cache, DecodeBatch(torch.arange(5), tables, context, True), 0.125)
    for i in range(5):
        alone = decode_attention(q[i:i + 1].contiguous(), k_cache, v_cache,
                                 DecodeBatch(torch.arange(1), tables[i:i + 1].contiguous(), context[i:i + 1], True),
                                 0.125)
        assert torch.equal(alone[0], together[i])
