"""Linear layers and embeddings whose weights stay in their GGUF block formats.

The matmul is `ponder/kernels/quant_matmul.c`: activations quantized to 8-bit blocks, integer dot
products against the 4-8-bit weights, one float accumulation per output element in block order
— so a row's result is bit-identical at every batch size. A fused matrix (Q/K/V, gate/up) whose
parts are stored in different formats is a list of segments, each in its own format, written
into its columns of one output; no part is requantized to match another.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from ponder import kernels
from ponder.model.repack import FORMAT_NAMES

KERNEL_NAMES = {0: "scalar", 1: "avx2", 2: "vnni256", 3: "avx512-vnni"}


class _Segment(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int64), ("n", ctypes.c_int64), ("col", ctypes.c_int64),
                ("w", ctypes.c_void_p)]


@dataclass
class QuantMatrix:
    """N rows of K columns in one kernel format: `data` is the packed bytes (repack.pack), or, for
    format None, a float32 [N, K] matrix (GGUF F32/F16/BF16 tensors run as fp32)."""

    format: int | None
    n: int
    k: int
    data: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@cache
def library(extra_flags: tuple[str, ...] = ()):
    """The kernel library (None without a C compiler); `extra_flags` build a variant."""
    lib = kernels.load("quant_matmul", extra_flags)
    if lib is None:
        return None
    P, I = kernels.PTR, kernels.I64
    for name in ("qlinear", "qlinear_ref"):
        getattr(lib, name).argtypes = [P, I, I, P, I, P, P, I]
        getattr(lib, name).restype = ctypes.c_int
    lib.qdequant_rows.argtypes = [I, P, I, P, I, P]
    lib.qdequant_rows.restype = ctypes.c_int
    lib.qmm_group_bytes.argtypes = [I, I]
    lib.qmm_group_bytes.restype = I
    lib.qmm_has_vnni.restype = I
    return lib


def available() -> bool:
    return library() is not None


def kernel_name() -> str:
    """Which integer dot product the kernels use on this CPU: avx512-vnni (512-bit vpdpbusd),
    vnni256 (256-bit), avx2 (vpmaddubsw) or scalar."""
    lib = library()
    return "none" if lib is None else KERNEL_NAMES[lib.qmm_has_vnni()]


class QuantLinear(nn.Module):
    """y = x @ W^T (+ bias) over segments of W stacked along the output dimension."""

    def __init__(self, segments: list[QuantMatrix], bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features = segments[0].k
        self.out_features = sum(s.n for s in segments)
        self.matrices = segments
        self.bias = bias
        cols = [sum(s.n for s in segments[:i]) for i in range(len(segments))]
        quant = [(s, c) for s, c in zip(segments, cols) if s.format is not None]
        self.dense = [(s.data, c) for s, c in zip(segments, cols) if s.format is None]
        # The kernel's view of the quantized segments (also handed to the native decoder stack).
        self.segment_table = (_Segment * len(quant))(*[_Segment(s.format, s.n, c, s.data.data_ptr()) for s, c in quant])

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.matrices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, library().qlinear)

    def run(self, x: torch.Tensor, fn) -> torch.Tensor:
        """x [M, K] through the kernel entry point `fn` (qlinear, or in tests qlinear_ref or
        another build's qlinear)."""
        x = x.contiguous()
        if x.dtype != torch.float32:
            x = x.float()
        rows = x.shape[0]
        y = torch.empty(rows, self.out_features)
        bias = None if self.bias is None else self.bias.data_ptr()
        if len(self.segment_table):
            status = fn(x.data_ptr(), rows, self.in_features, self.segment_table, len(self.segment_table), bias,
                        y.data_ptr(), self.out_features)
            if status != 0:
                raise ValueError(f"quantized matmul does not support K={self.in_features} with formats "
                                 f"{[FORMAT_NAMES.get(m.format) for m in self.matrices]}")
        for w, col in self.dense:
            out = y[:, col:col + w.shape[0]]
            out.copy_(x @ w.t())
            if self.bias is not None:
                out += self.bias[col:col + w.shape[0]]
        return y


class QuantEmbedding(nn.Module):
    """Token embeddings kept quantized; the rows a step needs are dequantized on lookup."""

    def __init__(self, matrix: QuantMatrix):
        super().__init__()
        self.matrix = matrix
        self.embedding_dim = matrix.k

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.matrix
        if m.format is None:
            return m.data.index_select(0, ids)
        ids = ids.contiguous().to(torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= m.n):
            raise IndexError(f"token id out of range [0, {m.n})")
        out = torch.empty(ids.numel(), m.k)
        library().qdequant_rows(m.format, m.data.data_ptr(), m.k, ids.data_ptr(), ids.numel(), out.data_ptr())
        return out
