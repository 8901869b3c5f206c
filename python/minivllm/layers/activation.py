"""SiLU-and-multiply, the gated activation of Qwen's MLP (a Triton kernel on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.layers import use_fused_kernels


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2 * d] -> [T, d]
        if use_fused_kernels(x) and x.dim() == 2 and x.stride(-1) == 1:
            from minivllm.kernels.activation import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
