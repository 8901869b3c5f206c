"""Triton: split-K GEMM partial sums for the row-parallel projections at decode batch sizes.

At decode batch sizes the o and down projections (N = hidden = 1024 outputs over K = 2048 or
3072 inputs in Qwen3-0.6B) give cuBLAS too few output tiles to fill the GPU: they run at 0.7-0.9
TB/s of weight reads. Splitting K over S programs per output tile fills it; each split writes its
float32 partial sum to `parts[s]`, and the consumer, the fused add + RMSNorm that always follows
these projections, adds the S partials up in split order (deterministic) as it reads them. So the
reduction costs no launch of its own.

Measured on an H200 (`benchmarks/bench_gemm.py`, CUDA-graph replay, per layer, o + down, cuBLAS
against the best split-K configuration per shape): M=16 12.5 -> 6.7 us, M=64 12.6 -> 7.1 us,
M=128 13.0 -> 9.0 us; at M=256 the gain is under 2 us, so larger batches stay on cuBLAS.
`splitk_config` uses one configuration near the best ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest M (tokens) given to split-K; bigger GEMMs fill the GPU by themselves.
MAX_SPLIT_K_TOKENS = 128


@triton.jit(do_not_specialize=["M"])  # one compile for every batch size
def _splitk_partials_kernel(
    x_ptr,  # [M, K], K contiguous
    w_ptr,  # [N, K], contiguous
    parts_ptr,  # [S, M, N] float32, contiguous
    M,
    N,
    K,
    stride_x,
    k_per_split,  # K // S, a multiple of BK
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = split * k_per_split + tl.arange(0, BK)
    m_mask = offs_m[:, None] < M
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_x + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, k_per_split, BK):
        a = tl.load(x_ptrs, mask=m_mask, other=0.0)
        b = tl.load(w_ptrs)
        acc = tl.dot(a, tl.trans(b), acc)
        x_ptrs += BK
        w_ptrs += BK
    out = parts_ptr + split.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=m_mask)


def splitk_config(m: int, n: int, k: int) -> tuple[int, int, int, int, int, int] | None:
    """(splits, BM, BN, BK, num_warps, num_stages) for an [m, k] x [n, k]^T GEMM, or None when
    split-K does not apply (too many rows, or a shape the tiles do not divide)."""
    if m < 1 or m > MAX_SPLIT_K_TOKENS:
        return None
    # Tuned on an H200 (bench_gemm.py): 8 splits up to 64 rows, 4 beyond.
    splits, stages = (8, 3) if m <= 64 else (4, 4)
    bm = max(16, min(64, triton.next_power_of_2(m)))
    bn, bk = 64, 64
    while splits > 1 and k % (splits * bk):
        splits //= 2
    if n % bn or k % (splits * bk) or splits == 1:
        return None
    return splits, bm, bn, bk, 4, stages


def splitk_partials(
    x: torch.Tensor,  # [M, K], bf16 or fp16, K contiguous
    weight: torch.Tensor,  # [N, K], contiguous, x's dtype
    config: tuple[int, int, int, int, int, int] | None = None,
) -> torch.Tensor | None:  # [S, M, N] float32: x @ weight^T == parts.sum(0)
    """The float32 partial sums of x @ weight^T over S slices of K, or None when split-K does
    not apply to this shape (the caller then runs a plain GEMM)."""
    assert x.dim() == 2 and x.stride(1) == 1, (x.shape, x.stride())
    assert weight.dim() == 2 and weight.is_contiguous() and weight.shape[1] == x.shape[1]
    assert x.dtype == weight.dtype, (x.dtype, weight.dtype)
    m, k = x.shape
    n = weight.shape[0]
    config = config or splitk_config(m, n, k)
    if config is None:
        return None
    splits, bm, bn, bk, num_warps, num_stages = config
    assert k % (splits * bk) == 0 and n % bn == 0, (config, n, k)
    parts = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    _splitk_partials_kernel[(n // bn, triton.cdiv(m, bm), splits)](
        x_ptr=x,
        w_ptr=weight,
        parts_ptr=parts,
        M=m,
        N=n,
        K=k,
        stride_x=x.stride(0),
        k_per_split=k // splits,
        BM=bm,
        BN=bn,
        BK=bk,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return parts
