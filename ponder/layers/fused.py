"""Fused per-token ops (`ponder/kernels/layer_ops.c`), each with its PyTorch equivalent as fallback.

At decode batch sizes a layer's norms, rotary embedding, cache writes and activation are a dozen
small torch ops whose dispatch costs more than their arithmetic; one native call each keeps the
step's glue small next to the matmuls. The fallbacks compute the same thing in torch (and are
what runs without a C compiler or in another dtype). The KV cache the rotary op writes may be
fp16 or float32; everything else is float32.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from ponder import kernels
from ponder.layers.attention import write_kv


@cache
def _ops():
    P, I, F32 = kernels.PTR, kernels.I64, kernels.F32
    add_rms_norm = kernels.bind("layer_ops", "add_rms_norm", [P, P, P, P, I, I, F32])
    if add_rms_norm is None:
        return None
    return {
        "add_rms_norm": add_rms_norm,
        "rope_and_cache": kernels.bind("layer_ops", "rope_and_cache", [P, P, P, P, P, P, P, I, I, I, I, I]),
        "silu_and_mul": kernels.bind("layer_ops", "silu_and_mul", [P, P, I, I]),
    }


def _native(data: tuple[torch.Tensor, ...], indices: tuple[torch.Tensor, ...] = ()):
    """The native ops if they exist and the tensors are what the C code reads: contiguous CPU
    float32 data and int64 indices. Otherwise None, and the caller runs its torch path."""
    ops = _ops()
    if ops is None:
        return None
    for tensors, dtype in ((data, torch.float32), (indices, torch.int64)):
        for t in tensors:
            if t.dtype != dtype or t.is_cuda or not t.is_contiguous():
                return None
    return ops


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`residual += delta` in place (when delta is given), then RMSNorm(residual) * weight."""
    ops = _native((residual, weight) if delta is None else (residual, weight, delta))
    if ops is None:
        if delta is not None:
            residual.add_(delta)
        return F.rms_norm(residual, (residual.shape[-1],), weight, eps)
    out = torch.empty_like(residual)
    n = residual.shape[-1]
    ops["add_rms_norm"](residual.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                        out.data_ptr(), residual.numel() // n, n, eps)
    return out


def _native_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the native op can write these caches: contiguous CPU fp16 or float32, alike."""
    return (k_cache.dtype == v_cache.dtype in (torch.float16, torch.float32) and not k_cache.is_cuda
            and k_cache.is_contiguous() and v_cache.is_contiguous())


def rope_and_cache(qkv: torch.Tensor, heads: int, kv_heads: int, positions: torch.Tensor, rope,
                   slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """qkv: [T, (H + 2 KVH) * D]. Rotates queries and keys, stores keys and values in their cache
    slots, and returns the rotated queries [T, H, D] (a view into qkv on the native path)."""
    tokens, dim = qkv.shape[0], rope.head_dim
    ops = _native((qkv, rope.cos, rope.signed_sin), (positions, slot_mapping))
    if ops is None or dim > 512 or not _native_cache(k_cache, v_cache):
        heads_view = qkv.view(tokens, heads + 2 * kv_heads, dim)
        qk = rope.apply(heads_view[:, :heads + kv_heads], rope.tables(positions))
        write_kv(qk[:, heads:], heads_view[:, heads + kv_heads:], k_cache, v_cache, slot_mapping)
        return qk[:, :heads]
    ops["rope_and_cache"](qkv.data_ptr(), positions.data_ptr(), rope.cos.data_ptr(), rope.signed_sin.data_ptr(),
                          slot_mapping.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                          int(k_cache.dtype == torch.float16), tokens, heads, kv_heads, dim)
    return qkv.view(tokens, heads + 2 * kv_heads, dim)[:, :heads]


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] -> silu(gate) * up, [T, I]."""
    ops = _native((gate_up,))
    if ops is None:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(tokens, inter)
    ops["silu_and_mul"](gate_up.data_ptr(), out.data_ptr(), tokens, inter)
    return out
