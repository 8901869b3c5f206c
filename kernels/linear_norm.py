"""Triton: a row-parallel projection and the add + RMSNorm after it as one kernel (decode sizes).

o_proj and down_proj are always followed by the residual add and an RMSNorm (the post-attention
norm, the next layer's input norm, the final norm). `kernels/linear.py` computes them as split-K
partial sums that `kernels/fused_norm.py` adds up: two kernels. Here the GEMM's own programs
finish the job, so the norm is no kernel (and no kernel boundary) of its own:

1. Every program computes its float32 partial tile (`tile_product`, the same GEMM and tile
   configuration as `linear(..., partials=True)`) and stores it to a scratch `[S, M, N]`.
2. It then counts itself in on its output tile's counter; the last of the S programs of a tile
   sums the S partials in split order, rounds, adds the residual and rounds (as
   `fused_add_rmsnorm` does: the same new residual bit for bit), writes the new residual tile
   and the tile's per-row sum of squares.
3. That program counts itself in on its row block's counter; the last of the row block's N
   tiles adds the sums of squares up, and normalizes the block's rows into the output.

"Last to arrive" needs no waiting, so no program depends on another being resident. Every
counter is reset to zero by the program that saw the last arrival, so the kernel leaves its
counters as it found them and replays in a CUDA graph with no memset; they live in one
persistent buffer per device (`_counters`), which assumes one such kernel runs at a time on a
device (one stream, as the engine's forward is). Release and acquire: each program's threads
store, meet at a barrier, and one thread adds to the counter with acq_rel semantics at GPU
scope; the last program reads what the others wrote through the L2 (`.cg`, the SM's L1 is not
coherent).

Rounding: as `linear(partials=True)` + `fused_add_rmsnorm`, except that a row's sum of squares
adds per-tile sums (each over BN columns) where the norm kernel sums the whole row at once: the
float32 sum may differ in its last bits, the output rarely by one ulp of its dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .linear import GemmConfig, _num_sms, gemm_config, tile_product
from .linear import supports as linear_supports
from .pdl import device_index, pdl_enabled, pdl_start

# Largest M the layers fold the norm in at (not yet measured). The last program of a row block
# normalizes its BM rows (16 up to 16 tokens, 64 past 32) across the whole hidden size alone, a
# serial tail that grows with BM and may cost more than the kernel boundary it saves.
# `linear_add_rmsnorm` itself takes any M the split-K GEMM does, so bench_layer_chain.py's
# +splitk_norm modes time it at every size.
MAX_TOKENS = 64
# Counters per device: row blocks first (a fixed offset, so the tile counters' address keeps its
# alignment and with it the compiled variant), then a grid's [m_tiles, n_tiles] output tiles (at
# most 256 up to 256 tokens at a hidden size of 8192).
_ROW_COUNTERS = 64
_NUM_COUNTERS = 4096
# The normalizing loop's step holds BM x NORM_BN values, at most 128 a thread at 4 warps: one
# step covers 16 rows of a 1024-wide hidden size, so the serial tail takes one round trip to the
# L2. The registers this takes cost no occupancy: the GEMM's pipeline buffers (shared memory)
# already bound it to one or two programs per SM.
_NORM_ELEMENTS = 16384


@triton.jit
def _arrive_last(count_ptr, num_arrivals):
    """Counts this program in at count_ptr; True in the last of `num_arrivals`, which then sees
    every store the others made before they arrived, and resets the count to zero."""
    tl.debug_barrier()  # all of this program's stores precede the one thread's release
    last = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == num_arrivals - 1
    if last:
        tl.store(count_ptr, 0)  # no one else touches it before the kernel ends
        tl.debug_barrier()  # every thread's loads follow the one thread's acquire
    return last


@triton.jit(do_not_specialize=["M"])  # one compile for every batch size
def _linear_add_rmsnorm_kernel(
    x_desc,  # [M, K] block [BM, BK]
    w_desc,  # [N, K] block [BN, BK]
    parts_ptr,  # [SPLITS, M, N] float32: each program's partial sum
    residual_ptr,  # [M, N], contiguous, x's dtype
    norm_weight_ptr,  # [N]
    out_ptr,  # [M, N], contiguous
    new_residual_ptr,  # [M, N], contiguous, x's dtype
    sum_sq_ptr,  # [n_tiles, M] float32: each output tile's per-row sum of squares
    tile_count_ptr,  # [m_tiles, n_tiles] int32, zero between calls
    row_count_ptr,  # [m_tiles] int32, zero between calls
    M,
    N,
    k_per_split,  # a multiple of BK
    eps,
    SPLITS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SWAP: tl.constexpr,  # weight rows on the MMA's M side (few tokens), else token rows
    NUM_STAGES: tl.constexpr,
    TILES_BLOCK: tl.constexpr,  # next power of two >= n_tiles
    NORM_BN: tl.constexpr,  # columns per step of the normalizing loop
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    tile_n = tl.program_id(0)
    tile_m = tl.program_id(1)
    split = tl.program_id(2)
    n_tiles = tl.num_programs(0)
    acc, _ = tile_product(
        x_desc, w_desc, tile_m * BM, tile_n * BN, split * k_per_split, k_per_split, N,
        BM, BN, BK, SWAP, False, NUM_STAGES,
    )  # fmt: skip
    offs_m = tile_m * BM + tl.arange(0, BM)
    offs_n = tile_n * BN + tl.arange(0, BN)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tile = offs_m[:, None] * N + offs_n[None, :]  # offsets of this tile in an [M, N] tensor
    part_stride = M.to(tl.int64) * N
    tl.store(parts_ptr + split * part_stride + tile, acc, mask=mask)
    if _arrive_last(tile_count_ptr + tile_m * n_tiles + tile_n, SPLITS):
        # The tile's last program: the partials in split order, then the add as
        # fused_add_rmsnorm does it.
        y = tl.load(parts_ptr + tile, mask=mask, other=0.0, cache_modifier=".cg")
        for s in tl.static_range(1, SPLITS):
            y += tl.load(
                parts_ptr + s * part_stride + tile, mask=mask, other=0.0, cache_modifier=".cg"
            )
        dtype = new_residual_ptr.dtype.element_ty
        r = tl.load(residual_ptr + tile, mask=mask, other=0.0)
        h = (y.to(dtype).to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(new_residual_ptr + tile, h, mask=mask)
        hf = h.to(tl.float32)
        tl.store(sum_sq_ptr + tile_n * M + offs_m, tl.sum(hf * hf, axis=1), mask=offs_m < M)
        if _arrive_last(row_count_ptr + tile_m, n_tiles):
            _normalize_rows(
                new_residual_ptr, sum_sq_ptr, norm_weight_ptr, out_ptr, offs_m, n_tiles, M, N,
                eps, TILES_BLOCK, NORM_BN,
            )  # fmt: skip


@triton.jit
def _normalize_rows(
    new_residual_ptr,  # [M, N]
    sum_sq_ptr,  # [n_tiles, M] float32
    norm_weight_ptr,  # [N]
    out_ptr,  # [M, N]
    offs_m,  # [BM] the row block's rows
    n_tiles,
    M,
    N,
    eps,
    TILES_BLOCK: tl.constexpr,
    NORM_BN: tl.constexpr,
):
    """out = norm_weight * norm(new residual) for a block of rows, from every tile's per-row sum
    of squares; the norm rounded to the residual's dtype before the weight, as in fused_norm."""
    tiles = tl.arange(0, TILES_BLOCK)
    sums = tl.load(
        sum_sq_ptr + tiles[:, None] * M + offs_m[None, :],
        mask=(tiles[:, None] < n_tiles) & (offs_m[None, :] < M),
        other=0.0,
        cache_modifier=".cg",
    )
    rstd = tl.math.rsqrt(tl.sum(sums, axis=0) / N + eps)  # [BM]; torch.rsqrt is rsqrtf too
    for n0 in tl.range(0, N, NORM_BN):
        cols = n0 + tl.arange(0, NORM_BN)
        mask = (offs_m[:, None] < M) & (cols[None, :] < N)
        block = offs_m[:, None] * N + cols[None, :]
        h = tl.load(new_residual_ptr + block, mask=mask, other=0.0, cache_modifier=".cg")
        normed = (h.to(tl.float32) * rstd[:, None]).to(h.dtype).to(tl.float32)
        w = tl.load(norm_weight_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + block, (w[None, :] * normed).to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    """The device's counters, zeroed once; every call leaves them at zero again."""
    return torch.zeros(_NUM_COUNTERS, dtype=torch.int32, device=device)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the layers hand x @ weight^T and the norm after it to `linear_add_rmsnorm`: the
    split-K GEMM takes the pair (`linear.supports`) and x has at most MAX_TOKENS rows."""
    return x.dim() == 2 and x.shape[0] <= MAX_TOKENS and linear_supports(x, weight, partials=True)


def linear_add_rmsnorm(
    x: torch.Tensor,  # [M, K], fp16 or bf16 (see linear.supports with partials)
    weight: torch.Tensor,  # [N, K], x's dtype
    residual: torch.Tensor,  # [M, N], x's dtype, contiguous
    norm_weight: torch.Tensor,  # [N]
    eps: float,
    *,
    config: tuple | None = None,  # a GemmConfig or its fields; default: gemm_config's partials
) -> tuple[torch.Tensor, torch.Tensor]:  # ([M, N], [M, N])
    """fused_add_rmsnorm(linear(x, weight, partials=True), residual, norm_weight, eps) in one
    kernel: (norm_weight * norm(y + residual), y + residual) with y = x @ weight^T. The new
    residual is a new tensor (bit for bit the two kernels' one); the output has the dtype
    norm_weight * y would promote to."""
    assert linear_supports(x, weight, partials=True), (x.shape, x.stride(), x.dtype, weight.shape)
    m, k = x.shape
    n = weight.shape[0]
    assert residual.shape == (m, n) and residual.dtype == x.dtype, (residual.shape, x.shape)
    assert residual.is_contiguous() and norm_weight.shape == (n,) and norm_weight.is_contiguous()
    if config is None:
        num_sms = _num_sms(device_index(x) if x.is_cuda else None)
        config = gemm_config(m, n, k, True, num_sms)
    else:
        config = GemmConfig(*config)
    splits, bm, bn, bk, num_warps, num_stages, swap = config
    k_per_split = triton.cdiv(triton.cdiv(k, bk), splits) * bk  # the last split may be short
    n_tiles, m_tiles = triton.cdiv(n, bn), triton.cdiv(m, bm)
    counters = _counters(x.device if not x.is_cuda else torch.device("cuda", device_index(x)))
    assert m_tiles <= _ROW_COUNTERS and m_tiles * n_tiles <= _NUM_COUNTERS - _ROW_COUNTERS
    parts = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    sum_sq = torch.empty((n_tiles, m), dtype=torch.float32, device=x.device)
    out_dtype = torch.promote_types(norm_weight.dtype, x.dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    new_residual = torch.empty_like(residual)
    pdl = pdl_enabled(x)
    _linear_add_rmsnorm_kernel[(n_tiles, m_tiles, splits)](
        x_desc=TensorDescriptor.from_tensor(x, [bm, bk]),
        w_desc=TensorDescriptor.from_tensor(weight, [bn, bk]),
        parts_ptr=parts,
        residual_ptr=residual,
        norm_weight_ptr=norm_weight,
        out_ptr=out,
        new_residual_ptr=new_residual,
        sum_sq_ptr=sum_sq,
        tile_count_ptr=counters[_ROW_COUNTERS:],
        row_count_ptr=counters,
        M=m,
        N=n,
        k_per_split=k_per_split,
        eps=eps,
        SPLITS=splits,
        BM=bm,
        BN=bn,
        BK=bk,
        SWAP=swap,
        NUM_STAGES=num_stages,
        TILES_BLOCK=triton.next_power_of_2(n_tiles),
        NORM_BN=min(triton.next_power_of_2(n), max(bn, _NORM_ELEMENTS // bm)),
        PDL=pdl,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    return out, new_residual
