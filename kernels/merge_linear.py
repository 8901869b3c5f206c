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

from .linear import _add_residual_if_last
from .paged_decode import DecodePartials, _num_splits_and_partition
from .pdl import pdl_enabled, pdl_launch_dependents, pdl_wait
from .prefetch import l2_prefetch, prefetch_args


@triton.jit(do_not_specialize=["M"])
def _merge_linear_kernel(
    part_out_ptr,  # [M, NUM_HEADS, max_num_splits, HEAD_DIM] float32
    part_lse_ptr,  # [M, NUM_HEADS, max_num_splits] float32, log2 units
    seq_lens_ptr,  # [M] int32
    w_ptr,  # [N, NUM_HEADS * HEAD_DIM]
    out_ptr,  # [NUM_HEADS, M, N] float32 partial sums
    residual_ptr,  # [M, N], ADD_RESIDUAL only
    h_ptr,  # [M, N]: residual + the product, ADD_RESIDUAL only (may alias residual_ptr)
    sumsq_ptr,  # [cdiv(N, BN), M] float32, ADD_RESIDUAL only
    counters_ptr,  # [cdiv(N, BN) * cdiv(M, BM)] int32, zero before and after, ADD_RESIDUAL only
    prefetch_ptr,  # PREFETCH only: prefetch_bytes bytes to ask L2 for (kernels/prefetch.py)
    prefetch_bytes,
    M,
    N,
    max_num_splits,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,  # a power of two
    BM: tl.constexpr,
    BN: tl.constexpr,
    MIN_PARTITION: tl.constexpr,  # the decode launch's, to recount each row's splits
    DEC_BLOCK_N: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,  # the last head of each tile adds the heads and the residual
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
    PREFETCH_LANES: tl.constexpr,  # 32 x num_warps
):
    if PREFETCH:
        l2_prefetch(prefetch_ptr, prefetch_bytes, PREFETCH_LANES)
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
    if ADD_RESIDUAL:  # as kernels/linear.py's split-K GEMM does, the heads as its splits
        tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        _add_residual_if_last(
            out_ptr, residual_ptr, h_ptr, sumsq_ptr, counters_ptr, M, N, rows, offs_n, tile,
            tl.program_id(0), NUM_HEADS,
        )  # fmt: skip


def _launch(
    partials: DecodePartials,
    weight: torch.Tensor,
    block_n: int,
    num_warps: int,
    add: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # residual, h, counters
    prefetch: torch.Tensor | None = None,  # a later GEMM's weight to ask L2 for (CUDA only)
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (partial sums, sumsq with `add`)
    part_out, part_lse = partials.part_out, partials.part_lse
    m, num_heads, max_num_splits, head_dim = part_out.shape
    n = weight.shape[0]
    assert weight.shape == (n, num_heads * head_dim) and weight.is_contiguous(), weight.shape
    assert weight.dtype == partials.dtype and head_dim & (head_dim - 1) == 0, weight.dtype
    assert part_out.is_contiguous() and part_lse.shape == (m, num_heads, max_num_splits)
    out = torch.empty((num_heads, m, n), dtype=torch.float32, device=weight.device)
    block_m = 16  # the smallest tile tl.dot takes; the rows are few (split decode)
    residual = h = counters = sumsq = None
    if add is not None:
        residual, h, counters = add
        for t in (residual, h):
            assert t.shape == (m, n) and t.dtype == weight.dtype and t.is_contiguous(), t.shape
        num_tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
        assert counters.dtype == torch.int32 and counters.numel() >= num_tiles, counters.shape
        sumsq = torch.empty((triton.cdiv(n, block_n), m), dtype=torch.float32, device=out.device)
    pdl = pdl_enabled(weight)
    _merge_linear_kernel[(triton.cdiv(n, block_n), num_heads, triton.cdiv(m, block_m))](
        part_out_ptr=part_out,
        part_lse_ptr=part_lse,
        seq_lens_ptr=partials.seq_lens,
        w_ptr=weight,
        out_ptr=out,
        residual_ptr=residual if add is not None else out,
        h_ptr=h if add is not None else out,
        sumsq_ptr=sumsq if add is not None else out,
        counters_ptr=counters if add is not None else out,
        M=m,
        N=n,
        max_num_splits=max_num_splits,
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BM=block_m,
        BN=block_n,
        MIN_PARTITION=partials.min_partition,
        DEC_BLOCK_N=partials.block_n,
        ADD_RESIDUAL=add is not None,
        PDL=pdl,
        num_warps=num_warps,
        launch_pdl=pdl,
        **prefetch_args(weight, prefetch, out, num_warps),
    )
    return out, sumsq


def merge_linear(
    partials: DecodePartials,
    weight: torch.Tensor,  # [N, num_heads * head_dim], contiguous, the attention output's dtype
    block_n: int = 64,
    num_warps: int = 4,
    prefetch: torch.Tensor | None = None,  # a later GEMM's weight to ask L2 for (CUDA only)
) -> torch.Tensor:  # [num_heads, M, N] float32, summing to merge(partials) @ weight^T
    """The o projection of split decode attention, its splits merged on the way in."""
    return _launch(partials, weight, block_n, num_warps, prefetch=prefetch)[0]


def merge_linear_add_residual(
    partials: DecodePartials,
    weight: torch.Tensor,  # [N, num_heads * head_dim]
    residual: torch.Tensor,  # [M, N] the weight's dtype, contiguous
    counters: torch.Tensor,  # int32, >= linear.num_tile_counters(N), zero; left zero
    *,
    residual_out: torch.Tensor | None = None,  # [M, N], contiguous; may be `residual` itself
    block_n: int = 64,
    num_warps: int = 4,
    prefetch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (h [M, N], sumsq [cdiv(N, block_n), M] float32)
    """`merge_linear` added to the residual in the kernel, as linear.linear_add_residual adds
    its split-K GEMM's: h and its squares summed per column tile, for the next GEMM's norm."""
    h = residual_out if residual_out is not None else torch.empty_like(residual)
    add = (residual, h, counters)
    _, sumsq = _launch(partials, weight, block_n, num_warps, add=add, prefetch=prefetch)
    assert sumsq is not None
    return h, sumsq
