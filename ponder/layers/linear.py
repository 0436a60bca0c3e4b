"""Linear layer with its weight stored as [in_features, out_features].

On this class of CPU, MKL runs `x @ W` (W row-major [in, out]) 1.2-1.5x faster than
`x @ W.T` (nn.Linear's [out, in] layout) for the small row counts of decode steps (measured
here: 30 layers of SmolLM2 at one row, 30 ms vs 43 ms), and no slower for prefill chunks.

Up to `SMALL_M` rows, the native kernel `ponder/kernels/small_matmul.c` runs instead: there a
matmul is one pass over W, and the kernel streams it at the machine's memory bandwidth (SmolLM2's
30 layers at one row: 16 ms against MKL's 25 ms; at 8 rows 30 ms against 56 ms).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from ponder import kernels

SMALL_M = 16


@cache
def _small_matmul():
    P, I = kernels.PTR, kernels.I64
    return kernels.bind("small_matmul", "small_matmul", [P, P, P, P, I, I, I])


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if (rows <= SMALL_M and x.dim() == 2 and x.dtype == self.weight.dtype == torch.float32
                and x.is_contiguous() and self.weight.is_contiguous() and (native := _small_matmul()) is not None):
            k, n = self.weight.shape
            y = torch.empty(rows, n)
            native(x.data_ptr(), self.weight.data_ptr(), None if self.bias is None else self.bias.data_ptr(),
                   y.data_ptr(), rows, k, n)
            return y
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x, self.weight)
