"""Triton: RMSNorm, optionally fused with the residual add that precedes it.

Same op order as `layers/rmsnorm.py` (and transformers' Qwen3RMSNorm): the residual add rounds to
the activation dtype, the norm runs in float32 and rounds to the activation dtype, and only then is
the weight multiplied in (rounded to the promoted dtype). One program normalises one row.

`fused_add_rmsnorm` also takes its input as float32 split-K partial sums `[S, T, N]` (from
`kernels/linear.py`): it adds them up in split order and rounds the sum to the residual's dtype,
as the GEMM's own output would have been, before the residual add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_enabled, pdl_start


@triton.jit(do_not_specialize=["num_rows"])  # read only with partial sums
def _rmsnorm_kernel(
    x_ptr,  # [T, N]; or [NUM_PARTS, T, N] float32 partial sums, contiguous
    residual_ptr,  # [T, N], read only when HAS_RESIDUAL
    weight_ptr,  # [N]
    out_ptr,  # [T, N], contiguous
    new_residual_ptr,  # [T, N], contiguous, written only when HAS_RESIDUAL
    stride_x,
    stride_residual,
    num_rows,
    n,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    NUM_PARTS: tl.constexpr,  # 0: x is the input itself; else the partial sums to add up
    BLOCK_N: tl.constexpr,  # next power of two >= n: the whole row lives in registers
    PDL: tl.constexpr,  # launched as a programmatic dependent (kernels/pdl.py)
):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < n
    if NUM_PARTS > 0:
        # Split order, float32, then the rounding the GEMM's output would have had.
        x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0)
        for s in tl.static_range(1, NUM_PARTS):
            x += tl.load(x_ptr + (s * num_rows + row) * n + offs, mask=mask, other=0.0)
        x = x.to(residual_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_residual + offs, mask=mask, other=0.0)
        # The sum rounds to the activation dtype before the norm, as `x + residual` does in torch.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_residual_ptr + row * n + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)  # torch.rsqrt is rsqrtf too
    y = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None,
    residual_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    num_parts = 0
    if x.dim() == 3:  # split-K partial sums: their sum is the input, in the residual's dtype
        assert residual is not None and x.dtype == torch.float32 and x.is_contiguous()
        num_parts = x.shape[0]
        act_dtype = residual.dtype
    else:
        assert x.dim() == 2 and x.stride(1) == 1, (x.shape, x.stride())
        act_dtype = x.dtype
    num_rows, n = x.shape[-2:]
    assert weight.shape == (n,) and weight.is_contiguous(), (weight.shape, n)
    assert act_dtype in (torch.float32, torch.float16, torch.bfloat16), act_dtype
    # `weight * x.to(dtype)` in torch: the product has the promoted dtype.
    out_dtype = torch.promote_types(weight.dtype, act_dtype)
    if out is None:
        out = torch.empty((num_rows, n), dtype=out_dtype, device=x.device)
    assert out.shape == (num_rows, n) and out.dtype == out_dtype and out.is_contiguous()
    new_residual = None
    if residual is not None:
        assert residual.shape == (num_rows, n), (residual.shape, x.shape)
        assert residual.dtype == act_dtype and residual.stride(1) == 1, residual.stride()
        new_residual = residual_out
        if new_residual is None:
            new_residual = torch.empty((num_rows, n), dtype=act_dtype, device=x.device)
        assert new_residual.shape == (num_rows, n) and new_residual.dtype == act_dtype
        assert new_residual.is_contiguous()
    if num_rows == 0:
        return out, new_residual
    block_n = triton.next_power_of_2(n)
    # 8 bf16 elements (16 bytes) per thread per load at hidden 1024 with 4 warps; wider rows get up
    # to 16 warps so no thread holds more than ~32 elements.
    num_warps = min(max(block_n // 256, 1), 16)
    pdl = pdl_enabled(x)
    _rmsnorm_kernel[(num_rows,)](
        x_ptr=x,
        residual_ptr=residual if residual is not None else x,
        weight_ptr=weight,
        out_ptr=out,
        new_residual_ptr=new_residual if new_residual is not None else out,
        stride_x=x.stride(-2),
        stride_residual=residual.stride(0) if residual is not None else 0,
        num_rows=num_rows,
        n=n,
        eps=eps,
        HAS_RESIDUAL=residual is not None,
        NUM_PARTS=num_parts,
        BLOCK_N=block_n,
        PDL=pdl,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    return out, new_residual


def rmsnorm(
    x: torch.Tensor,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
    *,
    out: torch.Tensor | None = None,  # [T, N], contiguous
) -> torch.Tensor:  # [T, N]
    """weight * norm(x), norm in float32 rounded to x.dtype."""
    return _launch(x, None, weight, eps, out, None)[0]


def fused_add_rmsnorm(
    x: torch.Tensor,  # [T, N]; or [S, T, N] float32 split-K partial sums of it
    residual: torch.Tensor,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
    *,
    out: torch.Tensor | None = None,  # [T, N], contiguous
    residual_out: torch.Tensor | None = None,  # [T, N], contiguous; may be `residual` itself
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, N], [T, N])
    """(weight * norm(x + residual), x + residual), the sum rounded to x.dtype. Given partial
    sums [S, T, N], x is their sum (split order, float32) rounded to residual.dtype.

    Each program reads its row before writing it, so `residual_out` may alias `residual` (and
    `out` may alias a contiguous `x`).
    """
    out, new_residual = _launch(x, residual, weight, eps, out, residual_out)
    assert new_residual is not None
    return out, new_residual
