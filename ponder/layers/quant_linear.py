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

ROWS_PER_GROUP = 8
BLOCK = 32


@dataclass(frozen=True)
class KernelFormat:
    """The kernel's view of a GGUF format (mirrors `FORMATS` in quant_matmul.c)."""

    id: int            # index in the kernel's table
    bits: int
    group: int         # 32-blocks per super-block (fp16 D and DM are per super-block)
    has_scale: bool    # an integer scale S per block (per half block when half_scales)
    has_min: bool
    offset: int
    half_scales: bool = False

    @property
    def block_bytes(self) -> int:
        scales = ROWS_PER_GROUP * (2 if self.half_scales else 1) if self.has_scale else 0
        mins = ROWS_PER_GROUP if self.has_min and self.group > 1 else 0
        return scales + mins + BLOCK * self.bits

    @property
    def header_bytes(self) -> int:
        return 2 * ROWS_PER_GROUP * (2 if self.has_min else 1)

    def group_bytes(self, k: int) -> int:
        """Bytes of one row group (8 rows) of a matrix with K columns."""
        return k // (BLOCK * self.group) * (self.header_bytes + self.group * self.block_bytes)


KERNEL_FORMATS: dict[str, KernelFormat] = {   # by GGUF type name
    "Q8_0": KernelFormat(0, 8, 1, False, False, 128),
    "Q4_0": KernelFormat(1, 4, 1, False, False, 8),
    "Q4_1": KernelFormat(2, 4, 1, False, True, 0),
    "Q5_0": KernelFormat(3, 5, 1, False, False, 16),
    "Q5_1": KernelFormat(4, 5, 1, False, True, 0),
    "Q4_K": KernelFormat(5, 4, 8, True, True, 0),
    "Q5_K": KernelFormat(6, 5, 8, True, True, 0),
    "Q6_K": KernelFormat(7, 6, 8, True, False, 32, half_scales=True),
}
FORMAT_NAMES = {fmt.id: name for name, fmt in KERNEL_FORMATS.items()}
KERNEL_NAMES = {0: "scalar", 1: "avx2", 2: "vnni256", 3: "avx512-vnni"}   # by qmm_isa()


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
    lib.qdequant_rows.argtypes = [I, P, I, I, P, I, P]
    lib.qdequant_rows.restype = ctypes.c_int
    lib.qmm_group_bytes.argtypes = [I, I]
    lib.qmm_group_bytes.restype = I
    lib.qmm_isa.restype = I
    return lib


def available() -> bool:
    return library() is not None


def kernel_name() -> str:
    """Which integer dot product the kernels use on this CPU: avx512-vnni (512-bit vpdpbusd),
    vnni256 (256-bit), avx2 (vpmaddubsw) or scalar."""
    lib = library()
    return "none" if lib is None else KERNEL_NAMES[lib.qmm_isa()]


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
        out = torch.empty(ids.numel(), m.k)
        status = library().qdequant_rows(m.format, m.data.data_ptr(), m.n, m.k, ids.data_ptr(), ids.numel(),
                                         out.data_ptr())
        if status == -2:
            raise IndexError(f"token id out of range [0, {m.n})")
        if status != 0:
            raise ValueError(f"embedding lookup does not support K={m.k} in format {FORMAT_NAMES.get(m.format)}")
        return out
