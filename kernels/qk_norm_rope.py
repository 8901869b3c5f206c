"""Triton: per-head RMSNorm of q and k (Qwen3) fused with rotary embedding (rotate-half layout).

Same op order as `layers/rmsnorm.py` followed by `layers/rotary.py`, with the activation-dtype
roundings in between: norm in float32 -> dtype, times the weight -> dtype, then
`x * cos + rotate_half(x) * sin` with each product and the sum rounded to the dtype. Without the
norm (Qwen2) only the rotary part runs. q and k may be strided views into the packed qkv output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_heads(
    x_ptr,  # [T, H, D] strided
    weight_ptr,  # [D]
    out_ptr,  # [T, H, D], contiguous
    cos1,  # [HALF] float32: the token's cos row, first half
    cos2,  # [HALF] float32: second half
    sin1,
    sin2,
    tok,
    stride_t,
    stride_h,
    num_heads,
    eps,
    HAS_NORM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    dtype = out_ptr.dtype.element_ty
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (offs_h < num_heads) & (offs_d < HALF)
    src = x_ptr + tok * stride_t + offs_h * stride_h + offs_d
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    if HAS_NORM:
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        ss = tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)  # [BLOCK_H]
        rstd = tl.math.rsqrt(ss / HEAD_DIM + eps)[:, None]
        w1 = tl.load(weight_ptr + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(weight_ptr + HALF + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
        x1 = (w1 * (f1 * rstd).to(dtype).to(tl.float32)).to(dtype)
        x2 = (w2 * (f2 * rstd).to(dtype).to(tl.float32)).to(dtype)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    # x * cos + cat(-x2, x1) * sin, each product rounded to the dtype as the torch ops do.
    o1 = (f1 * cos1[None, :]).to(dtype).to(tl.float32) + (-f2 * sin1[None, :]).to(dtype).to(
        tl.float32
    )
    o2 = (f2 * cos2[None, :]).to(dtype).to(tl.float32) + (f1 * sin2[None, :]).to(dtype).to(
        tl.float32
    )
    dst = out_ptr + tok * (num_heads * HEAD_DIM) + offs_h * HEAD_DIM + offs_d
    tl.store(dst, o1.to(dtype), mask=mask)
    tl.store(dst + HALF, o2.to(dtype), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr,  # [T, num_q_heads, head_dim], head_dim contiguous
    k_ptr,  # [T, num_kv_heads, head_dim], head_dim contiguous
    q_weight_ptr,  # [head_dim], read only when HAS_NORM
    k_weight_ptr,  # [head_dim], read only when HAS_NORM
    cos_ptr,  # [max_position, head_dim], contiguous
    sin_ptr,  # [max_position, head_dim], contiguous
    positions_ptr,  # [T] int32/int64
    q_out_ptr,  # [T, num_q_heads, head_dim], contiguous
    k_out_ptr,  # [T, num_kv_heads, head_dim], contiguous
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    num_q_heads,
    num_kv_heads,
    q_eps,
    k_eps,
    HAS_NORM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,  # HEAD_DIM // 2
    BLOCK_HQ: tl.constexpr,  # next power of two >= num_q_heads
    BLOCK_HK: tl.constexpr,  # next power of two >= num_kv_heads
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
):
    # One program per token: every q and k head of it, so the cos/sin row is read once.
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    dmask = offs_d < HALF
    row = pos * HEAD_DIM + offs_d
    cos1 = tl.load(cos_ptr + row, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + row + HALF, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + row, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + row + HALF, mask=dmask, other=0.0).to(tl.float32)
    _norm_rope_heads(
        q_ptr,
        q_weight_ptr,
        q_out_ptr,
        cos1,
        cos2,
        sin1,
        sin2,
        tok,
        stride_q_t,
        stride_q_h,
        num_q_heads,
        q_eps,
        HAS_NORM,
        HEAD_DIM,
        HALF,
        BLOCK_HQ,
        BLOCK_HALF,
    )
    _norm_rope_heads(
        k_ptr,
        k_weight_ptr,
        k_out_ptr,
        cos1,
        cos2,
        sin1,
        sin2,
        tok,
        stride_k_t,
        stride_k_h,
        num_kv_heads,
        k_eps,
        HAS_NORM,
        HEAD_DIM,
        HALF,
        BLOCK_HK,
        BLOCK_HALF,
    )


def qk_norm_rope(
    q: torch.Tensor,  # [T, num_q_heads, head_dim]
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [T] int32/int64
    cos_cache: torch.Tensor,  # [max_position, head_dim]
    sin_cache: torch.Tensor,  # [max_position, head_dim]
    q_weight: torch.Tensor | None = None,  # [head_dim]
    k_weight: torch.Tensor | None = None,  # [head_dim]
    q_eps: float = 1e-6,
    k_eps: float = 1e-6,
    *,
    q_out: torch.Tensor | None = None,  # [T, num_q_heads, head_dim], contiguous
    k_out: torch.Tensor | None = None,  # [T, num_kv_heads, head_dim], contiguous
) -> tuple[torch.Tensor, torch.Tensor]:  # contiguous [T, num_q_heads, head_dim], [T, kv, hd]
    """rope(q_norm(q)), rope(k_norm(k)); with no weights, rope(q), rope(k).

    q and k may be views into the packed qkv projection (any token and head stride, head_dim
    contiguous). Outputs are contiguous tensors in q's dtype, fresh unless q_out / k_out are given;
    a program reads all heads of its token before writing, so the outputs may alias q and k when
    those are contiguous.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    assert k.dim() == 3 and k.shape[0] == num_tokens and k.shape[2] == head_dim, (q.shape, k.shape)
    num_kv_heads = k.shape[1]
    assert q.dtype == k.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert q.stride(2) == 1 and k.stride(2) == 1, "head_dim must be contiguous"
    assert head_dim % 2 == 0, head_dim
    assert cos_cache.shape == sin_cache.shape and cos_cache.shape[1] == head_dim, cos_cache.shape
    assert cos_cache.is_contiguous() and sin_cache.is_contiguous()
    # Same dtypes everywhere, so no torch type promotion to mirror.
    assert cos_cache.dtype == sin_cache.dtype == q.dtype, (cos_cache.dtype, q.dtype)
    assert positions.shape == (num_tokens,), (positions.shape, num_tokens)
    assert positions.dtype in (torch.int32, torch.int64), positions.dtype
    has_norm = q_weight is not None
    assert (k_weight is not None) == has_norm, "q and k are normalised together or not at all"
    if has_norm:
        assert q_weight.shape == (head_dim,) and k_weight.shape == (head_dim,)
        assert q_weight.is_contiguous() and k_weight.is_contiguous()
        assert q_weight.dtype == k_weight.dtype == q.dtype, (q_weight.dtype, q.dtype)
    if q_out is None:
        q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if k_out is None:
        k_out = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    assert q_out.shape == q.shape and q_out.dtype == q.dtype and q_out.is_contiguous()
    assert k_out.shape == k.shape and k_out.dtype == k.dtype and k_out.is_contiguous()
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _qk_norm_rope_kernel[(num_tokens,)](
        q_ptr=q,
        k_ptr=k,
        q_weight_ptr=q_weight if has_norm else q,
        k_weight_ptr=k_weight if has_norm else k,
        cos_ptr=cos_cache,
        sin_ptr=sin_cache,
        positions_ptr=positions,
        q_out_ptr=q_out,
        k_out_ptr=k_out,
        stride_q_t=q.stride(0),
        stride_q_h=q.stride(1),
        stride_k_t=k.stride(0),
        stride_k_h=k.stride(1),
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        q_eps=q_eps,
        k_eps=k_eps,
        HAS_NORM=has_norm,
        HEAD_DIM=head_dim,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        # 16 q heads x 64 pairs = 1024 elements per half: 4 warps keep 8 per thread per load.
        num_warps=4,
    )
    return q_out, k_out
