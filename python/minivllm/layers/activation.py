"""SiLU-and-multiply, the gated activation of Qwen's MLP (a Triton kernel on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.layers import fused_kernels


class SiluAndMul(nn.Module):
    def __init__(self, fused: bool | None = None):
        super().__init__()
        self.kernels = fused_kernels("activation", fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2 * d] -> [T, d]
        if self.kernels is not None and x.dim() == 2 and x.stride(-1) == 1:
            return self.kernels.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
