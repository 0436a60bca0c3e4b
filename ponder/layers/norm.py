"""RMSNorm as in HF Llama: normalise in fp32, then scale (the fused native op where it applies)."""

import torch
from torch import nn

from ponder.layers.fused import add_rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_rms_norm(x, None, self.weight, self.eps)

    def add_and_norm(self, residual: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """`residual += delta` in place, then the norm of the sum (one pass instead of two)."""
        return add_rms_norm(residual, delta, self.weight, self.eps)
