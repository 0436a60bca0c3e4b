"""GGUF block formats -> the row-group layout of `ponder/kernels/quant_matmul.c`, losslessly.

A matrix [N, K] in any supported format is first split into its parts — unsigned quants `u`
[N, K] and the scales of every (super-)block — then packed for the kernel: 8 rows per group,
each 32-element block stored so that one 32-byte register holds 4 consecutive quants of each of
the 8 rows (see the kernel's header for the byte layout). Every row keeps its quants and scales
bit for bit: w = (D * S) * (u - offset) + DM * MN.

All of it is vectorized numpy over whole tensors: it runs once per model, and the result is
cached on disk by the loader.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES

from ponder.layers.quant_linear import BLOCK, KERNEL_FORMATS, ROWS_PER_GROUP, KernelFormat

# The kernel's format table lives beside its binding (layers/quant_linear.py); here, by GGUF type.
FORMATS: dict[QT, KernelFormat] = {QT[name]: fmt for name, fmt in KERNEL_FORMATS.items()}


@dataclass
class Parts:
    """A quantized matrix split into quants and scales (see the module docstring)."""

    u: np.ndarray               # uint8 [N, K]
    d: np.ndarray               # float16 [N, K / (32 G)]
    dm: np.ndarray | None       # float16 [N, K / (32 G)]; K-quants store -dmin
    s: np.ndarray | None        # int8 [N, K / 32] ([N, K / 16] with half scales)
    mn: np.ndarray | None       # uint8 [N, K / 32]


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0]


def _nibbles(qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return qs & 0x0F, qs >> 4


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 6-bit (scale, min) pairs of Q4_K / Q5_K from their 12 bytes [..., 12]."""
    q = packed.astype(np.uint8)
    lo_s, lo_m = q[..., 0:4] & 63, q[..., 4:8] & 63
    hi_s = (q[..., 8:12] & 0x0F) | ((q[..., 0:4] >> 6) << 4)
    hi_m = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return np.concatenate([lo_s, hi_s], -1), np.concatenate([lo_m, hi_m], -1)


def _high_bits(qh: np.ndarray, count: int, start: int = 0) -> np.ndarray:
    """Bits start .. start+count-1 of a little-endian uint32 [..., 1], as [..., count] 0/1 bytes."""
    return ((qh >> np.arange(start, start + count, dtype=np.uint32)) & 1).astype(np.uint8)


def split(raw: np.ndarray, qtype: QT, n: int, k: int) -> Parts:
    """raw: the tensor's bytes as stored in the GGUF ([N, K / block * block_bytes] uint8)."""
    block, size = GGML_QUANT_SIZES[qtype]
    b = np.asarray(raw, dtype=np.uint8).reshape(n, k // block, size)
    if qtype == QT.Q8_0:
        u = b[..., 2:] ^ np.uint8(0x80)
        return Parts(u.reshape(n, k), _f16(b, 0), None, None, None)
    if qtype in (QT.Q4_0, QT.Q4_1):
        lo, hi = _nibbles(b[..., 4 if qtype == QT.Q4_1 else 2:])
        u = np.concatenate([lo, hi], -1).reshape(n, k)
        return Parts(u, _f16(b, 0), _f16(b, 2) if qtype == QT.Q4_1 else None, None, None)
    if qtype in (QT.Q5_0, QT.Q5_1):
        at = 4 if qtype == QT.Q5_1 else 2
        qh = np.ascontiguousarray(b[..., at:at + 4]).view("<u4")
        lo, hi = _nibbles(b[..., at + 4:])
        u = np.concatenate([lo | (_high_bits(qh, 16) << 4), hi | (_high_bits(qh, 16, 16) << 4)], -1)
        return Parts(u.reshape(n, k), _f16(b, 0), _f16(b, 2) if qtype == QT.Q5_1 else None, None, None)
    if qtype in (QT.Q4_K, QT.Q5_K):
        sc, mn = _k_scales(b[..., 4:16])
        qs = b[..., 48:] if qtype == QT.Q5_K else b[..., 16:]
        chunks = qs.reshape(n, -1, 4, 32)                          # [N, SB, j, l]
        lo, hi = _nibbles(chunks)
        if qtype == QT.Q5_K:
            qh = b[..., 16:48][:, :, None, :]                      # [N, SB, 1, l]
            j = np.arange(4, dtype=np.uint8)[None, None, :, None]
            lo = lo | (((qh >> (2 * j)) & 1) << 4)
            hi = hi | (((qh >> (2 * j + 1)) & 1) << 4)
        u = np.stack([lo, hi], 3).reshape(n, k)                    # element 64 j + 32 h + l
        dm = (-_f16(b, 2).astype(np.float32)).astype(np.float16)   # exact: a sign flip
        return Parts(u, _f16(b, 0), dm, sc.reshape(n, -1).astype(np.int8), mn.reshape(n, -1))
    if qtype == QT.Q6_K:
        ql = b[..., :128].reshape(n, -1, 2, 64)
        qh = b[..., 128:192].reshape(n, -1, 2, 32)
        q1 = (ql[..., :32] & 15) | ((qh & 3) << 4)
        q2 = (ql[..., 32:] & 15) | (((qh >> 2) & 3) << 4)
        q3 = (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4)
        q4 = (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)
        u = np.stack([q1, q2, q3, q4], 3).reshape(n, k)            # element 128 half + 32 i + l
        s = b[..., 192:208].view(np.int8).reshape(n, -1)
        return Parts(u, _f16(b, 208), None, s, None)
    raise ValueError(f"GGUF tensor type {qtype.name} has no quantized kernel")


def pack(parts: Parts, fmt: KernelFormat) -> np.ndarray:
    """The kernel's layout of a matrix: uint8 [ceil(N / 8) * group_bytes(K)] (rows padded to 8)."""
    n, k = parts.u.shape
    rg = ROWS_PER_GROUP
    pad = -n % rg

    def grouped(a: np.ndarray) -> np.ndarray:   # [N, ...] -> [groups, 8, ...], zero rows appended
        if pad:
            a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
        return a.reshape(-1, rg, *a.shape[1:])

    groups = (n + pad) // rg
    nb = k // BLOCK
    u = grouped(parts.u).reshape(groups, rg, nb, 8, 4)              # [G, r, block, g, i]
    pieces = []                                                     # per block, in stored order
    if fmt.has_scale:
        s = grouped(parts.s).reshape(groups, rg, nb, -1)            # [G, r, block, halves]
        pieces.append(s.transpose(0, 2, 3, 1).reshape(groups, nb, -1).view(np.uint8))
    if fmt.has_min and fmt.group > 1:
        pieces.append(grouped(parts.mn).transpose(0, 2, 1))
    if fmt.bits == 8:
        pieces.append(u.transpose(0, 2, 3, 1, 4).reshape(groups, nb, -1))
    else:
        q = u & 0x0F
        nib = q[:, :, :, :4] | (q[:, :, :, 4:] << 4)                # [G, r, block, c, i]
        pieces.append(nib.transpose(0, 2, 3, 1, 4).reshape(groups, nb, -1))
        weights = (1 << np.arange(8, dtype=np.uint16))[None, None, None, :, None]
        for plane in range(fmt.bits - 4):
            bit = ((u >> (4 + plane)) & 1).astype(np.uint16)
            byte = (bit * weights).sum(3).astype(np.uint8)          # [G, r, block, i]
            pieces.append(byte.transpose(0, 2, 1, 3).reshape(groups, nb, -1))
    blocks = np.concatenate(pieces, -1)
    assert blocks.shape[-1] == fmt.block_bytes
    nsg = nb // fmt.group
    def halves(a: np.ndarray) -> np.ndarray:   # fp16 [N, SB] -> bytes [groups, SB, 16]
        return np.ascontiguousarray(grouped(a).transpose(0, 2, 1)).view(np.uint8).reshape(groups, nsg, -1)

    header = [halves(parts.d)] + ([halves(parts.dm)] if fmt.has_min else [])
    out = np.concatenate(header + [blocks.reshape(groups, nsg, -1)], -1)
    return np.ascontiguousarray(out).reshape(-1)


def dequantize_parts(parts: Parts, fmt: KernelFormat) -> np.ndarray:
    """Float32 [N, K] of the parts (for tests: the value every kernel row must reproduce)."""
    n, k = parts.u.shape
    sub = 16 if fmt.half_scales else BLOCK
    d = np.repeat(parts.d.astype(np.float32), BLOCK * fmt.group, 1)
    scale = d * np.repeat(parts.s.astype(np.float32), sub, 1) if fmt.has_scale else d
    w = scale * (parts.u.astype(np.float32) - fmt.offset)
    if fmt.has_min:
        dm = np.repeat(parts.dm.astype(np.float32), BLOCK * fmt.group, 1)
        w = w + (dm * np.repeat(parts.mn.astype(np.float32), BLOCK, 1) if fmt.group > 1 else dm)
    return w
