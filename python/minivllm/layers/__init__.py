"""Model layers. On CUDA the elementwise layers and the sampler run fused Triton kernels
(minivllm.kernels); MINIVLLM_FUSED_KERNELS=0 falls back to the plain-torch code everywhere, which
is what the CPU always runs."""

from __future__ import annotations

import os

import torch

_FUSED_KERNELS = os.environ.get("MINIVLLM_FUSED_KERNELS", "1") != "0"


def use_fused_kernels(x: torch.Tensor) -> bool:
    """Whether a layer should take its fused Triton path for this tensor."""
    return _FUSED_KERNELS and x.is_cuda
