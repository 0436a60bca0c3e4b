"""Linear layer with its weight stored as [in_features, out_features], run by the fastest kernel
for the row count, measured on this 2-core AVX2 machine (SmolLM2's 30 layers, ms per pass; the
64- and 1024-row columns are from a second run):

| rows                           |    1 |    2 |    4 |    8 |   16 |   64 | 1024 |
|--------------------------------|------|------|------|------|------|------|------|
| MKL `x @ W`                    |   23 |   40 |   52 |   80 |   86 |  125 | 1576 |
| oneDNN, weight prepacked       |   18 |   19 |   23 |   28 |   44 |  108 | 1473 |
| `ponder/kernels/small_matmul.c`|   13 |   18 |   25 |   30 |   72 |      |      |

Up to `SMALL_M` rows a matmul is one pass over W and the native kernel streams it at the memory
bandwidth; above, oneDNN with the weight reordered once into its blocked layout
(`pack()`, called by the loader) beats MKL's sgemm at every size. Without oneDNN, MKL runs.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from ponder import kernels

SMALL_M = 2
_PACK_BATCH_HINT = 64


@cache
def _small_matmul():
    P, I = kernels.PTR, kernels.I64
    return kernels.bind("small_matmul", "small_matmul", [P, P, P, P, I, I, I])


def _onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None   # oneDNN's layout of the weight, made by pack()

    def pack(self) -> None:
        """Reorder the weight once into oneDNN's blocked layout (float32 only)."""
        if self.weight.dtype == torch.float32 and _onednn_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.t().contiguous(), _PACK_BATCH_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.dtype == self.weight.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous():
            if rows <= SMALL_M and self.weight.is_contiguous() and (native := _small_matmul()) is not None:
                k, n = self.weight.shape
                y = torch.empty(rows, n)
                native(x.data_ptr(), self.weight.data_ptr(), None if self.bias is None else self.bias.data_ptr(),
                       y.data_ptr(), rows, k, n)
                return y
            if self.packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x, self.weight)
