"""Fused native layer ops against the torch formulas they replace."""

import pytest
import torch
import torch.nn.functional as F

from ponder.layers import fused
from ponder.layers.attention import write_kv
from ponder.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(fused._ops() is None, reason="no C compiler for the native kernels")


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_add_rms_norm(tokens):
    gen = torch.Generator().manual_seed(tokens)
    residual, delta = torch.randn(2, tokens, 576, generator=gen)
    weight = torch.rand(576, generator=gen) + 0.5
    expected_sum = residual + delta
    expected = F.rms_norm(expected_sum, (576,), weight, 1e-5)
    out = fused.add_rms_norm(residual, delta, weight, 1e-5)
    assert torch.equal(residual, expected_sum)                       # updated in place
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused.add_rms_norm(residual, None, weight, 1e-5), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (14, 2, 64), (4, 4, 128)])
def test_rope_and_cache(heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(heads)
    tokens, slots = 17, 64
    rope = RotaryEmbedding(dim, 512, 10000.0)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    slot_mapping = torch.randperm(slots, generator=gen)[:tokens]
    by_head = qkv.view(tokens, -1, dim).clone()
    expected_qk = rope.apply(by_head[:, :heads + kv_heads], rope.tables(positions))
    k_cache, v_cache = torch.zeros(2, slots // 16, 16, kv_heads, dim)

    q = fused.rope_and_cache(qkv, heads, kv_heads, positions, rope, slot_mapping, k_cache, v_cache)

    torch.testing.assert_close(q, expected_qk[:, :heads], atol=1e-6, rtol=1e-6)
    flat_k, flat_v = k_cache.view(slots, kv_heads, dim), v_cache.view(slots, kv_heads, dim)
    torch.testing.assert_close(flat_k[slot_mapping], expected_qk[:, heads:], atol=1e-6, rtol=1e-6)
    assert torch.equal(flat_v[slot_mapping], by_head[:, heads + kv_heads:])
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[slot_mapping] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


@pytest.mark.parametrize("kv_heads,dim", [(3, 64), (2, 128), (1, 20)])
def test_rope_and_cache_writes_fp16_like_torch(kv_heads, dim):
    """An fp16 cache holds exactly torch's .half() of the rotated keys and the values, over the
    whole fp16 range: overflow to inf, subnormals, and round-to-nearest-even ties."""
    gen = torch.Generator().manual_seed(dim)
    heads, tokens, slots = 2 * kv_heads, 23, 96
    rope = RotaryEmbedding(dim, 512, 10000.0)
    magnitudes = 10.0 ** torch.randint(-9, 6, (tokens, (heads + 2 * kv_heads) * dim), generator=gen)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen) * magnitudes
    qkv[0, -4:] = torch.tensor([65520.0, 2049.0, 2051.0, 2.0 ** -25])    # inf, and ties to even
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    slot_mapping = torch.randperm(slots, generator=gen)[:tokens]
    values = qkv.view(tokens, -1, dim)[:, heads + kv_heads:].clone()
    k_cache, v_cache = torch.zeros(2, slots // 16, 16, kv_heads, dim, dtype=torch.float16)

    fused.rope_and_cache(qkv, heads, kv_heads, positions, rope, slot_mapping, k_cache, v_cache)

    rotated_keys = qkv.view(tokens, -1, dim)[:, heads:heads + kv_heads]   # rotated in place
    flat_k, flat_v = k_cache.view(slots, kv_heads, dim), v_cache.view(slots, kv_heads, dim)
    assert torch.equal(flat_k[slot_mapping], rotated_keys.half())
    assert torch.equal(flat_v[slot_mapping], values.half())
    assert flat_v[slot_mapping[0], -1, -4:].tolist() == [float("inf"), 2048.0, 2052.0, 0.0]
    torch_k, torch_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)     # the fallback's write
    write_kv(rotated_keys, values, torch_k, torch_v, slot_mapping)
    assert torch.equal(torch_k, k_cache) and torch.equal(torch_v, v_cache)


@pytest.mark.parametrize("tokens", [1, 50])
def test_silu_and_mul(tokens):
    gate_up = torch.randn(tokens, 2 * 1536, generator=torch.Generator().manual_seed(tokens)) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_and_mul(gate_up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows,bias", [(1, False), (2, True), (1, True)])
def test_small_matmul_matches_mkl(rows, bias):
    from ponder.layers.linear import SMALL_M, Linear
    assert rows <= SMALL_M
    gen = torch.Generator().manual_seed(rows)
    layer = Linear(577, 963, bias=bias)          # odd sizes: remainder rows and columns
    layer.weight.copy_(torch.randn(577, 963, generator=gen))
    if bias:
        layer.bias.copy_(torch.randn(963, generator=gen))
    x = torch.randn(rows, 577, generator=gen)
    expected = x @ layer.weight + (layer.bias if bias else 0)
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", [3, 9, 64, 300])
def test_packed_onednn_linear_matches_mkl(rows):
    from ponder.layers.linear import SMALL_M, Linear, _onednn_available
    if not _onednn_available():
        pytest.skip("torch built without oneDNN")
    assert rows > SMALL_M
    gen = torch.Generator().manual_seed(rows)
    layer = Linear(576, 960, bias=True)
    layer.weight.copy_(torch.randn(576, 960, generator=gen))
    layer.bias.copy_(torch.randn(960, generator=gen))
    layer.pack()
    assert layer.packed is not None
    x = torch.randn(rows, 576, generator=gen)
    torch.testing.assert_close(layer(x), torch.addmm(layer.bias, x, layer.weight), atol=1e-4, rtol=1e-5)
