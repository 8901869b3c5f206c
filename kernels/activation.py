"""Triton: SiLU-and-multiply, the gated activation of Qwen's MLP.

Same roundings as `F.silu(gate) * up` in torch: silu in float32 rounded to the dtype, then the
product in float32 rounded to the dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_enabled, pdl_start


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2 * d], gate then up
    out_ptr,  # [T, d], contiguous
    stride_x,
    d,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent (kernels/pdl.py)
):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * d + offs, (silu * up).to(dtype), mask=mask)


def silu_and_mul(
    x: torch.Tensor,  # [T, 2 * d]
    *,
    out: torch.Tensor | None = None,  # [T, d], contiguous
) -> torch.Tensor:  # [T, d]
    """silu(x[:, :d]) * x[:, d:]."""
    assert x.dim() == 2 and x.stride(1) == 1, (x.shape, x.stride())
    assert x.shape[1] % 2 == 0, x.shape
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), x.dtype
    num_tokens, d = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty((num_tokens, d), dtype=x.dtype, device=x.device)
    assert out.shape == (num_tokens, d) and out.dtype == x.dtype and out.is_contiguous()
    if num_tokens == 0:
        return out
    # 1024 columns per program with 4 warps: 8 elements (16 bytes of bf16) per thread and load;
    # Qwen3-0.6B's d = 3072 gives 3 programs per token.
    block_d = min(1024, triton.next_power_of_2(d))
    grid = (num_tokens, triton.cdiv(d, block_d))
    pdl = pdl_enabled(x)
    _silu_and_mul_kernel[grid](
        x_ptr=x,
        out_ptr=out,
        stride_x=x.stride(0),
        d=d,
        BLOCK_D=block_d,
        PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )
    return out
