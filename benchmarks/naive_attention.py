"""The O(N^2)-memory baselines of bench_prefill_attention.py: a naive Triton attention (scores and
probabilities written to device memory, three kernels) and textbook PyTorch attention. One causal
sequence, q [N, H, D], k / v [N, KV heads, D] contiguous."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _naive_scores_kernel(
    q_ptr,  # [N, num_heads, D]
    k_ptr,  # [N, num_kv_heads, D]
    s_ptr,  # [num_heads, N, N] float32
    n_ctx,
    scale,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_m, pid_n, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    q = tl.load(
        q_ptr + offs_m[:, None] * NUM_HEADS * D + h * D + offs_d[None, :],
        mask=offs_m[:, None] < n_ctx,
        other=0.0,
    )
    k = tl.load(
        k_ptr + offs_n[:, None] * (NUM_HEADS // GROUP) * D + (h // GROUP) * D + offs_d[None, :],
        mask=offs_n[:, None] < n_ctx,
        other=0.0,
    )
    s = tl.dot(q, tl.trans(k)) * scale
    s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
    mask = (offs_m[:, None] < n_ctx) & (offs_n[None, :] < n_ctx)
    tl.store(
        s_ptr + h.to(tl.int64) * n_ctx * n_ctx + offs_m[:, None] * n_ctx + offs_n[None, :],
        s,
        mask=mask,
    )


@triton.jit
def _naive_softmax_kernel(
    s_ptr,  # [num_heads, N, N] float32
    p_ptr,  # [num_heads, N, N] bf16
    n_ctx,
    BLOCK: tl.constexpr,  # >= N: the whole row in registers
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    s = tl.load(s_ptr + row * n_ctx + offs, mask=offs < n_ctx, other=float("-inf"))
    p = tl.exp(s - tl.max(s, 0))
    p = p / tl.sum(p, 0)
    tl.store(p_ptr + row * n_ctx + offs, p.to(p_ptr.dtype.element_ty), mask=offs < n_ctx)


@triton.jit
def _naive_pv_kernel(
    p_ptr,  # [num_heads, N, N] bf16
    v_ptr,  # [N, num_kv_heads, D]
    o_ptr,  # [N, num_heads, D]
    n_ctx,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_m, h = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([BLOCK, D], dtype=tl.float32)
    for start in range(0, n_ctx, BLOCK):  # every key, masked zeros included: it is naive
        offs_n = start + tl.arange(0, BLOCK)
        p = tl.load(
            p_ptr + h.to(tl.int64) * n_ctx * n_ctx + offs_m[:, None] * n_ctx + offs_n[None, :],
            mask=(offs_m[:, None] < n_ctx) & (offs_n[None, :] < n_ctx),
            other=0.0,
        )
        v = tl.load(
            v_ptr + offs_n[:, None] * (NUM_HEADS // GROUP) * D + (h // GROUP) * D + offs_d[None, :],
            mask=offs_n[:, None] < n_ctx,
            other=0.0,
        )
        acc = tl.dot(p, v, acc)
    tl.store(
        o_ptr + offs_m[:, None] * NUM_HEADS * D + h * D + offs_d[None, :],
        acc.to(o_ptr.dtype.element_ty),
        mask=offs_m[:, None] < n_ctx,
    )


def naive_triton_attention(q, k, v, scale):
    """q [N, H, D], k/v [N, KVH, D] contiguous; one causal sequence."""
    n, h, d = q.shape
    group = h // k.shape[1]
    s = torch.empty(h, n, n, dtype=torch.float32, device=q.device)
    p = torch.empty(h, n, n, dtype=q.dtype, device=q.device)
    o = torch.empty_like(q)
    block = 64
    _naive_scores_kernel[(triton.cdiv(n, block), triton.cdiv(n, block), h)](
        q, k, s, n, scale, NUM_HEADS=h, GROUP=group, D=d, BLOCK=block, num_warps=4
    )
    _naive_softmax_kernel[(h * n,)](s, p, n, BLOCK=triton.next_power_of_2(n), num_warps=8)
    _naive_pv_kernel[(triton.cdiv(n, block), h)](
        p, v, o, n, NUM_HEADS=h, GROUP=group, D=d, BLOCK=block, num_warps=4
    )
    return o


def standard_attention(q, k, v, scale):
    """Textbook attention: expand KV heads, materialize [H, N, N] scores in float32."""
    n, h, _ = q.shape
    group = h // k.shape[1]
    qh = q.transpose(0, 1)  # [H, N, D]
    kh = k.repeat_interleave(group, dim=1).transpose(0, 1)
    vh = v.repeat_interleave(group, dim=1).transpose(0, 1)
    s = torch.matmul(qh, kh.transpose(1, 2)).float() * scale
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
    s.masked_fill_(causal, float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return torch.matmul(p, vh).transpose(0, 1)
