"""Triton: the model's GEMMs at decode batch sizes (y = x @ W^T, up to 256 tokens).

cuBLAS reads the weights of these small GEMMs well below the card's bandwidth: too few output
tiles to fill the GPU (o_proj and down_proj have N = hidden = 1024 outputs), and a launch that
cannot overlap the kernel before it. This kernel:
- loads its tiles with the tensor-memory accelerator (host tensor descriptors; rows past M and
  columns past K read as zeros), and puts the weight rows on the MMA's M side ("swap AB"), so even
  16 tokens fill a 64-row wgmma;
- for the row-parallel projections, splits K over S programs per output tile: each writes its
  float32 partial sum to `parts[s]`, and the consumer, the fused add + RMSNorm that always follows
  these projections, adds the S partials up in split order (deterministic) as it reads them;
- for the MLP's gate/up projection, can end in SiLU-and-multiply (`gated`): each program holds a
  gate tile and the matching up tile and writes silu(gate) * up, so the activation is no kernel
  of its own and the 2 x intermediate-wide product never leaves the SM;
- launches as a programmatic dependent (kernels/pdl.py), like every other kernel of the layer;
  with `early` each program reads its first weight columns (no kernel writes the weights)
  before it waits for the kernel before it, and only x after the wait.

`benchmarks/bench_layer_chain.py` measures what this buys a decoder layer against cuBLAS (its
norms, four GEMMs and SiLU over 28 layers of cold weights in one CUDA graph). Past 128 tokens
cuBLAS keeps qkv and gate/up (MAX_COLUMN_TOKENS), and the split-K GEMMs of larger models
(K >= 4096) past 32 tokens (`max_tokens`). `gemm_config` holds the tile shapes
`benchmarks/bench_gemm.py` found (cold weights, one GEMM at a time).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .pdl import (
    device_index,
    pdl_enabled,
    pdl_launch_dependents,
    pdl_start,
    pdl_wait,
    sm90_or_newer,
)

# Largest M (tokens) given to this kernel; bigger GEMMs (prefill) fill the GPU under cuBLAS.
MAX_TOKENS = 256
# Past this many tokens the column-parallel GEMMs (qkv, gate/up: N = 4096, 6144) are faster under
# cuBLAS, even with the launch overlap lost (bench_layer_chain.py); the split-K row-parallel ones
# stay here up to MAX_TOKENS.
MAX_COLUMN_TOKENS = 128
# Split-K GEMMs of K >= LARGE_K (o and down of Qwen3-8B and 14B, N = hidden = 4096 or 5120) are
# faster under cuBLAS past 32 tokens: their float32 partial sums grow with N, and the splits were
# tuned for N = 1024 (`bench_gemm.py --model-shape 8b` / `14b`, H100: 8B's o at 64 tokens 16.4
# us against 22.0, down at 128 40.4 against 52.3). The column-parallel ones are within a few
# percent of cuBLAS up to MAX_COLUMN_TOKENS there. MINIVLLM_GEMM_LARGE_K=0: no such limit.
LARGE_K_MAX_TOKENS = 32


def _large_k() -> int:
    value = os.environ.get("MINIVLLM_GEMM_LARGE_K", "4096")
    if not value.isdigit():
        raise ValueError(f"MINIVLLM_GEMM_LARGE_K={value!r}: expected a K (0: no limit)")
    return int(value)


LARGE_K = _large_k()


def max_tokens(k: int, partials: bool) -> int:
    """The most tokens (M) this kernel takes for a GEMM of inner size k; cuBLAS past them."""
    if not partials:
        return MAX_COLUMN_TOKENS
    return LARGE_K_MAX_TOKENS if LARGE_K and k >= LARGE_K else MAX_TOKENS


@triton.jit
def _zero_acc(BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr, GATED: tl.constexpr):
    """`_gemm_acc`'s starting sums: zeros in MMA orientation ([BN, BM], the tile of y^T, when
    SWAP), and a second tile for the up projection when GATED."""
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    up = tl.zeros_like(acc) if GATED else acc
    return acc, up


@triton.jit
def _gemm_acc(
    x_desc,
    w_desc,
    N,
    k0,
    k_len,
    off_m,
    off_n,
    acc,  # [BN, BM] when SWAP, else [BM, BN], float32: the sum so far
    up,  # GATED: the up projection's tile, as acc; else acc again (not read)
    BK: tl.constexpr,
    SWAP: tl.constexpr,
    GATED: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """acc (and up) plus x @ W^T over K columns k0 .. k0 + k_len, in MMA orientation."""
    for k in tl.range(k0, k0 + k_len, BK, num_stages=NUM_STAGES):
        x = x_desc.load([off_m, k])
        w = w_desc.load([off_n, k])
        if SWAP:
            acc = tl.dot(w, x.T, acc)
        else:
            acc = tl.dot(x, w.T, acc)
        if GATED:
            w_up = w_desc.load([N + off_n, k])
            if SWAP:
                up = tl.dot(w_up, x.T, up)
            else:
                up = tl.dot(x, w_up.T, up)
    return acc, up


@triton.jit
def _gemm_finish(acc, up, out_dtype: tl.constexpr, SWAP: tl.constexpr, GATED: tl.constexpr):
    """The [BM, BN] tile from `_gemm_acc`'s sums: transposed back, and with GATED
    silu(gate) * up as silu_and_mul on the rounded products (silu rounded, then the product)."""
    if SWAP:
        acc = acc.T
        up = up.T
    if GATED:
        dtype = out_dtype
        gate = acc.to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        acc = silu * up.to(dtype).to(tl.float32)
    return acc


@triton.jit
def _early_product(w_first, x_ptr, stride_x, M, K, k0, off_m, BM: tl.constexpr,
                   EARLY_K: tl.constexpr, SWAP: tl.constexpr):  # fmt: skip
    """w_first (a program's first EARLY_K weight columns, read before the PDL wait) times the
    matching x columns, read now: the float32 product in MMA orientation."""
    offs_m = off_m + tl.arange(0, BM)
    offs_k = k0 + tl.arange(0, EARLY_K)
    x = tl.load(
        x_ptr + offs_m[:, None].to(tl.int64) * stride_x + offs_k[None, :],
        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
        other=0.0,
    )
    if SWAP:
        acc = tl.dot(w_first, x.T)
    else:
        acc = tl.dot(x, w_first.T)
    return acc


@triton.jit(do_not_specialize=["M"])  # one compile for every batch size
def _linear_kernel(
    x_desc,  # [M, K] block [BM, BK]
    w_desc,  # [N, K] block [BN, BK]; [2N, K] when GATED (gate rows, then up rows)
    out_ptr,  # [M, N] x's dtype; or [S, M, N] float32 when PARTIALS
    x_ptr,  # x itself (EARLY_K): [M, K], row stride stride_x
    w_ptr,  # the weight itself (EARLY_K): [N, K] ([2N, K] when GATED), contiguous
    stride_x,
    M,
    N,
    K,
    k_per_split,  # a multiple of BK
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SWAP: tl.constexpr,  # weight rows on the MMA's M side (few tokens), else token rows
    PARTIALS: tl.constexpr,
    GATED: tl.constexpr,  # out = silu(x @ W[:N]^T) * (x @ W[N:]^T), each rounded as torch would
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
    EARLY_K: tl.constexpr,  # > 0: the first EARLY_K weight columns read before the PDL wait
):
    off_n = tl.program_id(0) * BN
    off_m = tl.program_id(1) * BM
    split = tl.program_id(2)
    k0 = split * k_per_split
    if EARLY_K > 0:
        # The weights are no kernel's output: a program reads its first columns while the
        # kernel before it is still running, and only x after the wait.
        pdl_launch_dependents(PDL)
        rows = off_n + tl.arange(0, BN)
        cols = k0 + tl.arange(0, EARLY_K)
        w_rows = w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
        w_mask = (rows[:, None] < N) & (cols[None, :] < K)
        w_first = tl.load(w_rows, mask=w_mask, other=0.0)
        if GATED:
            up_first = tl.load(w_rows + N * K, mask=w_mask, other=0.0)
        pdl_wait(PDL)
        acc = _early_product(w_first, x_ptr, stride_x, M, K, k0, off_m, BM, EARLY_K, SWAP)
        up = acc
        if GATED:
            up = _early_product(up_first, x_ptr, stride_x, M, K, k0, off_m, BM, EARLY_K, SWAP)
    else:
        pdl_start(PDL)
        acc, up = _zero_acc(BM, BN, SWAP, GATED)
    acc, up = _gemm_acc(x_desc, w_desc, N, k0 + EARLY_K, k_per_split - EARLY_K, off_m, off_n,
                        acc, up, BK, SWAP, GATED, NUM_STAGES)  # fmt: skip
    acc = _gemm_finish(acc, up, out_ptr.dtype.element_ty, SWAP, GATED)
    offs_m = off_m + tl.arange(0, BM)
    offs_n = off_n + tl.arange(0, BN)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if PARTIALS:
        out = out_ptr + (split.to(tl.int64) * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(out, acc, mask=mask)
    else:
        out = out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


class GemmConfig(NamedTuple):
    splits: int  # K slices (partial sums); 1 for a plain output
    block_m: int  # token rows per program
    block_n: int  # weight rows (outputs) per program
    block_k: int
    num_warps: int
    num_stages: int
    swap: bool = True  # weight rows on the MMA's M side


# Split-K partial sums (row-parallel o / down projections, N = 1024: 16 output tiles of 64):
# (largest M, config), the first row with M <= its bound applies. Tuned on an H200.
_PARTIALS_TABLE = (
    (16, GemmConfig(8, 16, 64, 128, 4, 4)),
    (32, GemmConfig(8, 32, 64, 128, 4, 4)),
    (64, GemmConfig(8, 64, 64, 128, 4, 4)),
    (128, GemmConfig(4, 64, 64, 128, 4, 5)),
    (224, GemmConfig(4, 64, 128, 128, 4, 4)),
    (MAX_TOKENS, GemmConfig(4, 128, 64, 128, 4, 4)),
)


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return 132  # an H100 / H200: the interpreter's stand-in
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Shared memory a program's pipeline may take (an H100 / H200 SM has 227 KB).
_SMEM_BYTES = 200_000


def gemm_config(
    m: int,
    n: int,
    k: int,
    partials: bool,
    num_sms: int = 132,
    gated: bool = False,
    splits: int = 0,
) -> GemmConfig | None:
    """The configuration for an [m, k] x [n, k]^T GEMM, or None where cuBLAS is faster (past
    `max_tokens`). Tuned on an H200 for Qwen3-0.6B's shapes (bench_gemm.py with cold weights,
    then bench_layer_chain.py). `gated`: n outputs of SiLU-and-multiply over 2n weight rows, two
    weight tiles per stage. `splits` > 0 (partials): that many K slices instead of the table's,
    fewer where K is short (the qkv GEMM's partial sums, `layers.linear.QKV_SPLITS`)."""
    if m < 1 or m > max_tokens(k, partials):
        return None
    if gated:
        assert not partials
        config = gemm_config(m, 2 * n, k, False, num_sms)
        stage_bytes = (2 * config.block_n + config.block_m) * config.block_k * 2
        return config._replace(num_stages=min(config.num_stages, _SMEM_BYTES // stage_bytes))
    if partials:
        config = next(c for bound, c in _PARTIALS_TABLE if m <= bound)
        splits = splits or config.splits
        while splits > 1 and k < splits * config.block_k:  # short K: fewer splits
            splits //= 2
        return config._replace(splits=splits)
    # The consumer wants y itself: no split. Few tokens: one token tile, weight rows on the
    # MMA's M side. More: 64-token tiles while that gives one program per SM at most (64 weight
    # rows each), else one 128-token tile.
    if m <= 64:
        return GemmConfig(1, max(16, triton.next_power_of_2(m)), 64, 128, 4, 5)
    if triton.cdiv(m, 64) * triton.cdiv(n, 64) <= num_sms:
        return GemmConfig(1, 64, 64, 128, 4, 4)
    return GemmConfig(1, 128, 64, 128, 4, 4)


def supports(
    x: torch.Tensor, weight: torch.Tensor, partials: bool = False, gated: bool = False
) -> bool:
    """Whether `linear` takes this pair: fp16/bf16, a token count `gemm_config` gives this
    kernel, the 16-byte alignment of rows and base addresses that tensor descriptors need, and
    on CUDA a Hopper or newer GPU (the only ones it was tuned and tested on; the interpreter
    runs it on the CPU). `gated` needs an even number of weight rows and no partials."""
    if x.is_cuda and not sm90_or_newer(x):
        return False
    if gated and (partials or weight.shape[0] % 2):
        return False
    return (
        x.dim() == 2
        and x.dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
        and 1 <= x.shape[0] <= max_tokens(x.shape[1], partials)
        and x.stride(1) == 1
        and weight.is_contiguous()
        and weight.shape[1] == x.shape[1]
        and (x.stride(0) * x.element_size()) % 16 == 0
        and (weight.shape[1] * weight.element_size()) % 16 == 0
        and x.data_ptr() % 16 == 0
        and weight.data_ptr() % 16 == 0
    )


def linear(
    x: torch.Tensor,  # [M, K], fp16 or bf16, K contiguous (see `supports`)
    weight: torch.Tensor,  # [N, K], contiguous, x's dtype
    *,
    partials: bool = False,
    gated: bool = False,
    config: tuple | None = None,  # a GemmConfig or its fields
    early: int = 0,
    splits: int = 0,
) -> torch.Tensor:  # [M, N] x.dtype; with partials [S, M, N] float32 summing to x @ weight^T
    """x @ weight^T; with `partials`, its float32 partial sums over S slices of K (S may be 1;
    `splits` > 0: S as `gemm_config` gives it for that many); with `gated`,
    silu(x @ gate^T) * (x @ up^T) for weight = [gate; up] ([M, N / 2]).
    `early` > 0: each program reads up to that many of its first weight columns before its PDL
    wait (see `early_columns`)."""
    assert supports(x, weight, partials, gated), (x.shape, x.stride(), x.dtype, weight.shape)
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    assert partials or not splits, "splits: for partial sums only"
    if config is None:
        num_sms = _num_sms(device_index(x) if x.is_cuda else None)
        config = gemm_config(m, n, k, partials, num_sms, gated, splits)
    else:
        config = GemmConfig(*config)
    assert config is not None, (m, n, k, partials)
    splits, bm, bn, bk, num_warps, num_stages, swap = config
    assert partials or splits == 1, config
    k_per_split = triton.cdiv(triton.cdiv(k, bk), splits) * bk  # the last split may be short
    if partials:
        out = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    early_k = early_columns(early, k_per_split, bk)
    # The early tiles pass through shared memory too: fewer pipeline stages (two at least), and
    # fewer early columns where even two would not fit.
    row_bytes = ((2 * bn if gated else bn) + bm) * x.element_size()
    while early_k and row_bytes * (early_k + 2 * bk) > _SMEM_BYTES:
        early_k = early_k // 2 if early_k > bk else 0
    if early_k:
        num_stages = max(2, min(num_stages, (_SMEM_BYTES // row_bytes - early_k) // bk))
    pdl = pdl_enabled(x)
    _linear_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), splits)](
        x_desc=TensorDescriptor.from_tensor(x, [bm, bk]),
        w_desc=TensorDescriptor.from_tensor(weight, [bn, bk]),
        out_ptr=out,
        x_ptr=x,
        w_ptr=weight,
        stride_x=x.stride(0),
        M=m,
        N=n,
        K=k,
        k_per_split=k_per_split,
        BM=bm,
        BN=bn,
        BK=bk,
        SWAP=swap,
        PARTIALS=partials,
        GATED=gated,
        NUM_STAGES=num_stages,
        PDL=pdl,
        EARLY_K=early_k,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    return out


def early_columns(early: int, k_per_split: int, block_k: int) -> int:
    """The weight columns a program reads before its PDL wait when up to `early` are asked
    for: the largest power-of-two multiple of block_k within early and its K slice (the
    pipelined loop after them steps by block_k to the slice's end), else 0."""
    if early < 0:
        raise ValueError(f"early={early}: expected a number of weight columns (0: none)")
    columns = 0
    while (columns or block_k) * (2 if columns else 1) <= min(early, k_per_split):
        columns = columns * 2 if columns else block_k
    return columns
