"""RMSNorm, optionally fused with the residual add that precedes it.

On CUDA one Triton kernel (`kernels/fused_norm.py`) does the add and the norm; the torch code below
is the CPU path and the kernel's test oracle. With a residual, x may also be the split-K partial
sums a row-parallel projection left (`SplitKPartials`): the kernel adds them up as it reads them.
"""

from __future__ import annotations

import torch
from torch import nn

from minivllm.layers import fused_kernels
from minivllm.layers.linear import SplitKPartials


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, fused: bool | None = None):
        super().__init__()
        self.eps = eps
        self.kernels = fused_kernels("fused_norm", fused)
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as transformers' Qwen3RMSNorm, so float32 results match bit for bit.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(
        self, x: torch.Tensor | SplitKPartials, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with `residual`: (norm(x + residual), x + residual)."""
        if isinstance(x, SplitKPartials):
            assert residual is not None, "split-K partial sums come with a residual"
            if self.kernels is None:
                x = x.materialize()
            else:
                shape = residual.shape
                out, new_residual = self.kernels.fused_add_rmsnorm(
                    x.parts, residual.reshape(-1, shape[-1]), self.weight, self.eps
                )
                return out.view(shape), new_residual.view(shape)
        if self.kernels is not None:
            return self._forward_fused(x, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _forward_fused(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [T, hidden]
        if residual is None:
            return self.kernels.rmsnorm(x2, self.weight, self.eps).view(shape)
        out, new_residual = self.kernels.fused_add_rmsnorm(
            x2, residual.reshape(-1, shape[-1]), self.weight, self.eps
        )
        return out.view(shape), new_residual.view(shape)
