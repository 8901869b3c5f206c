"""Triton, an experiment not on the engine's path until measured: the o projection of a decode step
that merges the split decode attention's partial results itself, so the reduce kernel goes.

`_decode_attention(reduce=False)` leaves each split's normalized output and log-sum-exp
(`DecodePartials`). Program (n tile, head, row tile) of this kernel reads its weight tile
[BN, head_dim] (head `head`'s columns of W_o) before its PDL wait, since the weights are nobody's
output; after the wait it merges that head's splits for its rows (online, in log2 units, rounded
to the activation dtype as the reduce kernel's output is) and multiplies: one K slice per head,
so the output is split-K partial sums [num_heads, M, N] that the fused add + RMSNorm after the o
projection adds up (kernels/fused_norm.py), as it does the Triton GEMM's. No atomics: every
program merges its own rows of its own head (the n tiles of one head repeat the merge, reading
the partials from L2).

`bench_layer_chain.py --context N --modes triton+pdl triton+pdl+merge` times it in the layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_decode import DecodePartials, _num_splits_and_partition
from .pdl import pdl_enabled, pdl_launch_dependents, pdl_wait


@triton.jit(do_not_specialize=["M"])
def _merge_linear_kernel(
    part_out_ptr,  # [M, NUM_HEADS, max_num_splits, HEAD_DIM] float32
    part_lse_ptr,  # [M, NUM_HEADS, max_num_splits] float32, log2 units
    seq_lens_ptr,  # [M] int32
    w_ptr,  # [N, NUM_HEADS * HEAD_DIM]
    out_ptr,  # [NUM_HEADS, M, N] float32 partial sums
    M,
    N,
    max_num_splits,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,  # a power of two
    BM: tl.constexpr,
    BN: tl.constexpr,
    MIN_PARTITION: tl.constexpr,  # the decode launch's, to recount each row's splits
    DEC_BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_launch_dependents(PDL)
    head = tl.program_id(1)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = tl.program_id(2) * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = rows < M
    # Before the wait: the weights, and the step's uploaded seq_lens.
    w = tl.load(
        w_ptr
        + offs_n[:, None].to(tl.int64) * (NUM_HEADS * HEAD_DIM)
        + head * HEAD_DIM
        + offs_d[None, :],
        mask=(offs_n < N)[:, None],
        other=0.0,
    )  # [BN, HEAD_DIM]
    seq_len = tl.load(seq_lens_ptr + rows, mask=row_mask, other=0)
    num_splits, _ = _num_splits_and_partition(seq_len, max_num_splits, MIN_PARTITION, DEC_BLOCK_N)
    pdl_wait(PDL)
    base = (rows.to(tl.int64) * NUM_HEADS + head) * max_num_splits  # [BM]
    # Finite fills: a row without splits (padding) keeps x = 0 instead of inf - inf.
    m_run = tl.full([BM], -1e30, dtype=tl.float32)
    l_run = tl.zeros([BM], dtype=tl.float32)
    x = tl.zeros([BM, HEAD_DIM], dtype=tl.float32)
    for s in range(tl.max(num_splits, 0)):
        valid = (s < num_splits) & row_mask
        lse = tl.load(part_lse_ptr + base + s, mask=valid, other=-1e30)
        part = tl.load(
            part_out_ptr + (base + s)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        m_new = tl.maximum(m_run, lse)
        alpha = tl.exp2(m_run - m_new)
        beta = tl.where(valid, tl.exp2(lse - m_new), 0.0)
        x = x * alpha[:, None] + part * beta[:, None]
        l_run = l_run * alpha + beta
        m_run = m_new
    x = (x / tl.maximum(l_run, 1e-30)[:, None]).to(w.dtype)  # the attention output's rounding
    acc = tl.dot(w, tl.trans(x))  # [BN, BM]: y^T for these rows and outputs
    out = out_ptr + (head * M + rows[None, :]).to(tl.int64) * N + offs_n[:, None]
    tl.store(out, acc, mask=(offs_n < N)[:, None] & row_mask[None, :])


def merge_linear(
    partials: DecodePartials,
    weight: torch.Tensor,  # [N, num_heads * head_dim], contiguous, the attention output's dtype
    block_n: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:  # [num_heads, M, N] float32, summing to merge(partials) @ weight^T
    """The o projection of split decode attention, its splits merged on the way in."""
    part_out, part_lse = partials.part_out, partials.part_lse
    m, num_heads, max_num_splits, head_dim = part_out.shape
    n = weight.shape[0]
    assert weight.shape == (n, num_heads * head_dim) and weight.is_contiguous(), weight.shape
    assert weight.dtype == partials.dtype and head_dim & (head_dim - 1) == 0, weight.dtype
    assert part_out.is_contiguous() and part_lse.shape == (m, num_heads, max_num_splits)
    out = torch.empty((num_heads, m, n), dtype=torch.float32, device=weight.device)
    block_m = 16  # the smallest tile tl.dot takes; the rows are few (split decode)
    pdl = pdl_enabled(weight)
    _merge_linear_kernel[(triton.cdiv(n, block_n), num_heads, triton.cdiv(m, block_m))](
        part_out_ptr=part_out,
        part_lse_ptr=part_lse,
        seq_lens_ptr=partials.seq_lens,
        w_ptr=weight,
        out_ptr=out,
        M=m,
        N=n,
        max_num_splits=max_num_splits,
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BM=block_m,
        BN=block_n,
        MIN_PARTITION=partials.min_partition,
        DEC_BLOCK_N=partials.block_n,
        PDL=pdl,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    return out
