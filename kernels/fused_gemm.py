"""Triton: the two column-parallel projections of a decode step with their elementwise consumer in
the GEMM's epilogue, one launch each instead of two.

- `qkv_norm_rope`: the packed qkv projection; each program computes one head (q, k or v) for a
  tile of tokens, as its two halves, then applies that head's q/k RMSNorm and rotary embedding
  (q/k heads) and writes q to `q_out`, and k and v into their KV-cache slots.
- `gate_up_silu`: the packed gate/up projection; each program computes matching gate and up
  columns and writes silu(gate) * up.

Same roundings as the unfused path: the accumulator is rounded to the activation dtype (the GEMM's
output), then the epilogue does what `kernels/qk_norm_rope.py` / `kernels/activation.py` do. Only
the GEMM's summation order differs from cuBLAS. The configurations are for decode batch sizes
(`MAX_FUSED_TOKENS`); larger batches keep cuBLAS and the separate kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minivllm.kernels.qk_norm_rope import norm_rope

# Largest M (tokens) given to the fused GEMMs; prefill-sized steps keep cuBLAS.
MAX_FUSED_TOKENS = 256


@triton.jit(do_not_specialize=["M"])  # one compile for every batch size
def _qkv_norm_rope_kernel(
    x_ptr,  # [M, K], K contiguous
    w_ptr,  # [(num_q_heads + 2 * num_kv_heads) * HEAD_DIM, K], contiguous
    q_weight_ptr,  # [HEAD_DIM], read only when HAS_NORM
    k_weight_ptr,  # [HEAD_DIM], read only when HAS_NORM
    cos_ptr,  # [max_position, HEAD_DIM], contiguous
    sin_ptr,  # [max_position, HEAD_DIM], contiguous
    positions_ptr,  # [M] int32/int64
    slot_mapping_ptr,  # [M] int32/int64, slots < 0 skipped
    q_out_ptr,  # [M, num_q_heads, HEAD_DIM], contiguous
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, HEAD_DIM], contiguous
    v_cache_ptr,  # same shape as k_cache
    M,
    K,
    stride_x,
    num_q_heads,
    num_kv_heads,
    q_eps,
    k_eps,
    HAS_NORM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,  # HEAD_DIM // 2, a power of two
    BM: tl.constexpr,
    BK: tl.constexpr,
):
    head = tl.program_id(0)  # q heads, then k heads, then v heads
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, HALF)
    offs_k = tl.arange(0, BK)
    m_mask = offs_m < M
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_x + offs_k[None, :]
    w1_ptrs = w_ptr + (head * HEAD_DIM + offs_d)[:, None].to(tl.int64) * K + offs_k[None, :]
    w2_ptrs = w1_ptrs + HALF * K
    acc1 = tl.zeros((BM, HALF), dtype=tl.float32)
    acc2 = tl.zeros((BM, HALF), dtype=tl.float32)
    for _ in range(0, K, BK):
        a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        acc1 = tl.dot(a, tl.trans(tl.load(w1_ptrs)), acc1)
        acc2 = tl.dot(a, tl.trans(tl.load(w2_ptrs)), acc2)
        x_ptrs += BK
        w1_ptrs += BK
        w2_ptrs += BK
    dtype = q_out_ptr.dtype.element_ty
    x1 = acc1.to(dtype)  # the projection's output, as cuBLAS would round it
    x2 = acc2.to(dtype)
    cols = offs_d[None, :]
    kv_row_size = num_kv_heads * HEAD_DIM  # a cache slot's stride
    if head < num_q_heads + num_kv_heads:  # q or k: norm + rope
        pos = tl.load(positions_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        row = pos[:, None] * HEAD_DIM + cols
        cos1 = tl.load(cos_ptr + row, mask=m_mask[:, None], other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + row + HALF, mask=m_mask[:, None], other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + row, mask=m_mask[:, None], other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + row + HALF, mask=m_mask[:, None], other=0.0).to(tl.float32)
        if head < num_q_heads:
            o1, o2 = norm_rope(
                x1, x2, q_weight_ptr, cols, cos1, cos2, sin1, sin2, q_eps, HAS_NORM, HEAD_DIM, HALF
            )
            dst = q_out_ptr + offs_m[:, None].to(tl.int64) * (num_q_heads * HEAD_DIM)
            dst += head * HEAD_DIM + cols
            tl.store(dst, o1, mask=m_mask[:, None])
            tl.store(dst + HALF, o2, mask=m_mask[:, None])
        else:
            o1, o2 = norm_rope(
                x1, x2, k_weight_ptr, cols, cos1, cos2, sin1, sin2, k_eps, HAS_NORM, HEAD_DIM, HALF
            )
            # int64: slot * kv_row_size can pass 2^31 in a large pool; slot -1 (a padding row
            # of a replayed CUDA graph) writes nowhere.
            slot = tl.load(slot_mapping_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)
            smask = (slot >= 0)[:, None]
            dst = k_cache_ptr + slot[:, None] * kv_row_size
            dst += (head - num_q_heads) * HEAD_DIM + cols
            tl.store(dst, o1, mask=smask)
            tl.store(dst + HALF, o2, mask=smask)
    else:  # v: stored as projected
        slot = tl.load(slot_mapping_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)
        smask = (slot >= 0)[:, None]
        dst = v_cache_ptr + slot[:, None] * kv_row_size
        dst += (head - num_q_heads - num_kv_heads) * HEAD_DIM + cols
        tl.store(dst, x1, mask=smask)
        tl.store(dst + HALF, x2, mask=smask)


@triton.jit(do_not_specialize=["M"])
def _gate_up_silu_kernel(
    x_ptr,  # [M, K], K contiguous
    w_ptr,  # [2 * d, K], contiguous: gate rows, then up rows
    out_ptr,  # [M, d], contiguous
    M,
    K,
    d,
    stride_x,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    m_mask = offs_m < M
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_x + offs_k[None, :]
    g_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    u_ptrs = g_ptrs + d.to(tl.int64) * K
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):
        a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        acc_g = tl.dot(a, tl.trans(tl.load(g_ptrs)), acc_g)
        acc_u = tl.dot(a, tl.trans(tl.load(u_ptrs)), acc_u)
        x_ptrs += BK
        g_ptrs += BK
        u_ptrs += BK
    dtype = out_ptr.dtype.element_ty
    # The GEMM's output rounding, then silu_and_mul's: silu in float32 rounded, the product rounded.
    gate = acc_g.to(dtype).to(tl.float32)
    up = acc_u.to(dtype).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    dst = out_ptr + offs_m[:, None].to(tl.int64) * d + offs_n[None, :]
    tl.store(dst, (silu * up).to(dtype), mask=m_mask[:, None])


def qkv_config(m: int) -> tuple[int, int, int, int]:
    """(BM, BK, num_warps, num_stages) of the qkv GEMM for m tokens."""
    bm = max(16, min(64, triton.next_power_of_2(m)))
    return bm, 128, 4, 4


def gate_up_config(m: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, num_warps, num_stages) of the gate/up GEMM for m tokens."""
    bm = max(16, min(64, triton.next_power_of_2(m)))
    return bm, 64, 128, 4, 4


def qkv_norm_rope(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [(num_q_heads + 2 * num_kv_heads) * head_dim, K]
    positions: torch.Tensor,  # [M] int32/int64
    cos_cache: torch.Tensor,  # [max_position, head_dim]
    sin_cache: torch.Tensor,  # [max_position, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [M] int32/int64, slots < 0 skipped
    num_q_heads: int,
    q_weight: torch.Tensor | None = None,  # [head_dim]
    k_weight: torch.Tensor | None = None,  # [head_dim]
    q_eps: float = 1e-6,
    k_eps: float = 1e-6,
    *,
    config: tuple[int, int, int, int] | None = None,
    q_out: torch.Tensor | None = None,  # [M, num_q_heads, head_dim], contiguous
) -> torch.Tensor:  # [M, num_q_heads, head_dim]
    """rope(q_norm(q)) of x @ weight^T's q part; rope(k_norm(k)) and v go into cache slot
    `slot_mapping[t]`. What `qk_norm_rope_store_kv` does to the projection's output, in the
    projection's launch."""
    assert x.dim() == 2 and x.stride(1) == 1, (x.shape, x.stride())
    assert weight.dim() == 2 and weight.is_contiguous() and weight.shape[1] == x.shape[1]
    assert x.dtype == weight.dtype == k_cache.dtype == v_cache.dtype == cos_cache.dtype
    m, k = x.shape
    num_kv_heads, head_dim = k_cache.shape[2:]
    num_heads = num_q_heads + 2 * num_kv_heads
    assert weight.shape[0] == num_heads * head_dim, (weight.shape, num_heads, head_dim)
    half = head_dim // 2
    assert half == triton.next_power_of_2(half), f"head_dim {head_dim}: halves must be 2^n"
    assert cos_cache.shape == sin_cache.shape and cos_cache.shape[1] == head_dim
    assert cos_cache.is_contiguous() and sin_cache.is_contiguous()
    assert k_cache.shape == v_cache.shape and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert positions.shape == (m,) and slot_mapping.shape == (m,), (positions.shape, m)
    assert (q_weight is None) == (k_weight is None), "q and k are normalised together"
    if q_weight is not None:
        assert q_weight.shape == k_weight.shape == (head_dim,)
        assert q_weight.dtype == k_weight.dtype == x.dtype
    if q_out is None:
        q_out = torch.empty((m, num_q_heads, head_dim), dtype=x.dtype, device=x.device)
    assert q_out.shape == (m, num_q_heads, head_dim) and q_out.is_contiguous()
    if m == 0:
        return q_out
    bm, bk, num_warps, num_stages = config or qkv_config(m)
    assert k % bk == 0, (k, bk)
    _qkv_norm_rope_kernel[(num_heads, triton.cdiv(m, bm))](
        x_ptr=x,
        w_ptr=weight,
        q_weight_ptr=q_weight if q_weight is not None else weight,
        k_weight_ptr=k_weight if k_weight is not None else weight,
        cos_ptr=cos_cache,
        sin_ptr=sin_cache,
        positions_ptr=positions,
        slot_mapping_ptr=slot_mapping,
        q_out_ptr=q_out,
        k_cache_ptr=k_cache,
        v_cache_ptr=v_cache,
        M=m,
        K=k,
        stride_x=x.stride(0),
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        q_eps=q_eps,
        k_eps=k_eps,
        HAS_NORM=q_weight is not None,
        HEAD_DIM=head_dim,
        HALF=half,
        BM=bm,
        BK=bk,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return q_out


def gate_up_silu(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [2 * d, K]: gate rows, then up rows
    *,
    config: tuple[int, int, int, int, int] | None = None,
    out: torch.Tensor | None = None,  # [M, d], contiguous
) -> torch.Tensor:  # [M, d]
    """silu(x @ W_gate^T) * (x @ W_up^T), rounded as SiluAndMul after the projection."""
    assert x.dim() == 2 and x.stride(1) == 1, (x.shape, x.stride())
    assert weight.dim() == 2 and weight.is_contiguous() and weight.shape[1] == x.shape[1]
    assert x.dtype == weight.dtype, (x.dtype, weight.dtype)
    m, k = x.shape
    d = weight.shape[0] // 2
    bm, bn, bk, num_warps, num_stages = config or gate_up_config(m)
    assert weight.shape[0] == 2 * d and d % bn == 0 and k % bk == 0, (weight.shape, bn, bk)
    if out is None:
        out = torch.empty((m, d), dtype=x.dtype, device=x.device)
    assert out.shape == (m, d) and out.dtype == x.dtype and out.is_contiguous()
    if m == 0:
        return out
    _gate_up_silu_kernel[(d // bn, triton.cdiv(m, bm))](
        x_ptr=x,
        w_ptr=weight,
        out_ptr=out,
        M=m,
        K=k,
        d=d,
        stride_x=x.stride(0),
        BM=bm,
        BN=bn,
        BK=bk,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
