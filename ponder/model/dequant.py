"""Vectorized dequantization of GGUF tensor data into torch tensors.

Bit layouts follow llama.cpp's ``ggml-quants.c`` ``dequantize_row_*`` (the same
as ``gguf.quants``). Blocks are decoded with whole-tensor torch ops over large
chunks (never a Python loop over blocks), so the work is vectorized and
multi-threaded. Float math is done in float32 in the reference's operation
order, so results match ``gguf.quants.dequantize`` bit for bit.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES

__all__ = ["SUPPORTED_TYPES", "dequantize"]

# Elements decoded per chunk: big enough to amortize per-op dispatch and to be
# split across threads, small enough that intermediates stay in cache and
# reuse warm allocations instead of page-faulting fresh ones.
_CHUNK_ELEMS = 1 << 20

# Byte -> its 8 bits spread over 8 bytes (bit j -> byte j, as 0x00 or 0x10, i.e.
# already in the 5th-bit position). Stored as int64 so one gather per qh byte
# yields 8 output bytes: ~10x faster than a broadcast shift against a tensor of
# shift amounts, which torch does not vectorize for uint8.
_BIT_SPREAD = (
    (((torch.arange(256).view(256, 1) >> torch.arange(8)) & 1) << 4)
    .to(torch.uint8)
    .contiguous()
    .view(torch.int64)
    .view(256)
)


def _as_torch(arr: np.ndarray) -> torch.Tensor:
    # GGUFReader hands out read-only memmap views; torch warns about those, but
    # we only ever read from them, and copying would double load time and RAM.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """fp16 field at byte ``offset`` of every block, as float32 [n, 1]."""
    return blocks[:, offset : offset + 2].view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Split bytes [..., k] into contiguous [..., 2, k]: low nibbles, then high."""
    # uint8 bitwise ops on strided views (a field inside each block) take a slow
    # scalar path; on a contiguous copy they vectorize, and the copy is cheap.
    qs = qs.contiguous()
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2)


def _high_bits32(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: little-endian 32-bit qh [n, 4 bytes] -> [n, 32] of (bit i) << 4."""
    # int32 indices: index_select with int64 ones is several times slower here.
    idx = qh.reshape(-1).to(torch.int32)
    return torch.index_select(_BIT_SPREAD, 0, idx).view(torch.uint8).view(-1, 32)


def _signed(q: torch.Tensor, bias: int) -> torch.Tensor:
    # q - bias wraps around in uint8; reinterpreting as int8 gives the signed
    # value without widening to a bigger integer type.
    return q.sub_(bias).view(torch.int8)


def _kquant_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte Q4_K/Q5_K field into eight 6-bit scales and mins."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


# Each decoder reads uint8 blocks [n, type_size] and writes float32
# [n, block_size] into ``out``. Float math is in-place passes over ``out``, not
# mixed-dtype ops: int8 * float32 type promotion takes a slow, non-vectorized
# cast path and allocates. The pass order matches the reference, so rounding is
# identical.


def _dq_q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b[:, 2:].view(torch.int8)).mul_(_f16(b, 0))


def _dq_q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _signed(_nibbles(b[:, 2:]).view(-1, 32), 8)
    out.copy_(q).mul_(_f16(b, 0))


def _dq_q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 4:]).view(-1, 32)
    out.copy_(q).mul_(_f16(b, 0)).add_(_f16(b, 2))


def _dq_q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 6:]).view(-1, 32)
    q |= _high_bits32(b[:, 2:6])
    out.copy_(_signed(q, 16)).mul_(_f16(b, 0))


def _dq_q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 8:]).view(-1, 32)
    q |= _high_bits32(b[:, 4:8])
    out.copy_(q).mul_(_f16(b, 0)).add_(_f16(b, 2))


def _dq_q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    sc, mn = _kquant_scale_min(b[:, 4:16])
    # Same association as the reference: (d*sc)*q - (dmin*m).
    d = (_f16(b, 0) * sc).view(n, 8, 1)
    dm = (_f16(b, 2) * mn).view(n, 8, 1)
    # 4 runs of 32 bytes; low nibbles are sub-block 2j, high nibbles 2j+1.
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).view(n, 8, 32)
    out.view(n, 8, 32).copy_(q).mul_(d).sub_(dm)


def _dq_q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    sc, mn = _kquant_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc).view(n, 8, 1)
    dm = (_f16(b, 2) * mn).view(n, 8, 1)
    q = _nibbles(b[:, 48:].reshape(n, 4, 32)).view(n, 8, 32)
    # Bit s of qh[l] is the 5th bit of element l of sub-block s. Scalar shifts
    # per s (moving bit s to bit 4) vectorize; a broadcast shift tensor doesn't.
    qh = b[:, 16:48].contiguous()
    hb = [(qh << (4 - s)) if s <= 4 else (qh >> (s - 4)) for s in range(8)]
    q |= torch.stack(hb, dim=1) & 0x10
    out.view(n, 8, 32).copy_(q).mul_(d).sub_(dm)


def _dq_q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    # Two halves of 128 elements; in each, 64 ql bytes give 2x64 low 4-bit parts
    # and 32 qh bytes give 4x32 high 2-bit parts, in the same flat order.
    ql = _nibbles(b[:, :128].reshape(n, 2, 64)).view(n, 256)
    qh = b[:, 128:192].reshape(n, 2, 32).contiguous()
    # 2-bit field k of each qh byte, moved to bits 4-5.
    qh = torch.stack([qh << 4, qh << 2, qh, qh >> 2], dim=2) & 0x30
    ql |= qh.view(n, 256)
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8)).view(n, 16, 1)
    out.view(n, 16, 16).copy_(_signed(ql, 32).view(n, 16, 16)).mul_(d)


_QUANT_DECODERS: dict[QT, Callable[[torch.Tensor, torch.Tensor], None]] = {
    QT.Q8_0: _dq_q8_0,
    QT.Q4_0: _dq_q4_0,
    QT.Q4_1: _dq_q4_1,
    QT.Q5_0: _dq_q5_0,
    QT.Q5_1: _dq_q5_1,
    QT.Q4_K: _dq_q4_k,
    QT.Q5_K: _dq_q5_k,
    QT.Q6_K: _dq_q6_k,
}

# Float types: raw element dtype as numpy and the torch dtype to reinterpret as.
_FLOAT_TYPES: dict[QT, tuple[type, torch.dtype]] = {
    QT.F32: (np.float32, torch.float32),
    QT.F16: (np.float16, torch.float16),
    QT.BF16: (np.uint16, torch.bfloat16),
}

SUPPORTED_TYPES: frozenset[QT] = frozenset(_QUANT_DECODERS) | frozenset(_FLOAT_TYPES)


def dequantize(
    raw: np.ndarray,
    qtype: QT,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode GGUF tensor bytes into a contiguous ``dtype`` tensor of ``shape``.

    ``raw`` is ``GGUFReader.tensors[i].data`` (any shape; read as flat bytes for
    quantized types). ``shape`` is the row-major torch shape, i.e. ggml ``ne``
    reversed. The result never aliases ``raw``.
    """
    qtype = QT(qtype)
    shape = tuple(int(s) for s in shape)
    numel = int(np.prod(shape, dtype=np.int64))
    flat = np.ascontiguousarray(raw).reshape(-1)

    if qtype in _FLOAT_TYPES:
        np_dtype, t_dtype = _FLOAT_TYPES[qtype]
        # BF16 may arrive as uint8 bytes or uint16; F16/F32 as typed arrays.
        # .view reinterprets bytes either way.
        vals = flat.view(np_dtype)
        if vals.size != numel:
            raise ValueError(f"{qtype.name}: got {vals.size} elements, shape {shape} needs {numel}")
        src = _as_torch(vals).view(t_dtype)
        out = src.to(dtype)
        if out.data_ptr() == src.data_ptr():
            # Same dtype: .to() returned the mmap-backed view; callers may write.
            out = out.clone()
        return out.view(shape)

    decoder = _QUANT_DECODERS.get(qtype)
    if decoder is None:
        raise NotImplementedError(f"dequantization of GGML type {qtype.name} is not supported")

    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if not shape or shape[-1] % block_size:
        raise ValueError(f"{qtype.name}: last dim of {shape} is not a multiple of {block_size}")
    n_blocks = numel // block_size
    data = flat.view(np.uint8)
    if data.size != n_blocks * type_size:
        raise ValueError(
            f"{qtype.name}: got {data.size} bytes, shape {shape} needs {n_blocks * type_size}"
        )

    blocks = _as_torch(data).view(n_blocks, type_size)
    out = torch.empty((n_blocks, block_size), dtype=dtype)
    # Decode in chunks so the uint8/float32 intermediates stay cache-resident and
    # reuse warm memory; only ``out`` itself is touched once. Chunks are still
    # large enough for torch's intra-op threading to split.
    step = max(1, _CHUNK_ELEMS // block_size)
    scratch = None if dtype == torch.float32 else torch.empty((min(step, n_blocks), block_size))
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        if scratch is None:
            decoder(blocks[start:stop], out[start:stop])
        else:
            buf = scratch[: stop - start]
            decoder(blocks[start:stop], buf)
            out[start:stop].copy_(buf)
    return out.view(shape)
