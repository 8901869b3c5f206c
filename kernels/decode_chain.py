"""Triton: a persistent kernel for a decode step's non-attention chain over all layers (prototype).

A measurement prototype, not used by the engine: it runs the chain of
`benchmarks/bench_layer_chain.py` for up to 16 tokens in one launch of about one program per SM,
to find out what a decode megakernel would save over the per-kernel chain (about nine kernel
boundaries per layer, each paid even with programmatic dependent launch). Per layer, four
phases, each split over every program and followed by a grid-wide barrier:

  0 qkv      x = RMSNorm(residual) (input norm, computed on the fly); qkv = x @ W_qkv^T
             (written; the barrier after it is where attention would sit)
  1 o        split-K partial sums of attn @ W_o^T (attn: a fixed attention output, as in the
             bench); the last split of each output tile adds the splits up in split order and
             the residual: residual' = o + residual
  2 gate/up  x = RMSNorm(residual') (post-attention norm, on the fly); gate_up = x @ W_gu^T
  3 down     split-K partial sums of (silu(gate) * up) @ W_down^T, SiLU-and-multiply applied as
             gate_up is loaded; the last split adds: residual'' = down + residual'

Work split: a phase is a list of tasks, each BN weight rows (on the MMA's M side, tokens padded
to BM = 16: "swap AB" as in kernels/linear.py) times one K slice, dealt to the programs round
robin; a program runs its tasks as one flat loop over (task, K step), so its loads stream from
one task into the next. The row-parallel o and down projections (N = hidden) take SPLITS K
slices so that every program has a task; the split that arrives last at its tile's counter
reduces (deterministic: split order, then the roundings of `fused_add_rmsnorm`). The norms are
computed redundantly by every program that needs them (their input is M x hidden, at most 32 KB
read from L2), so they cost no barrier.

Grid barrier: one int64 arrival counter that only grows. A program reads it once at start,
before its own first arrival: no barrier of this launch can have completed by then, so the count
is `launches_so_far * barriers * grid + k` with k < grid, and the floor to a multiple of the grid
is this launch's base; barrier j is met once the counter reaches base + j * grid. Nothing needs
resetting between launches (CUDA-graph replays), as long as the same counter always sees the
same grid (`ChainWorkspace` holds both). Each split-K tile counter is reset by the tile's last
arriver. Arrival: a CTA barrier (so the whole CTA's stores precede it), then an acq_rel atomic add
(whose result spares the last arriver any polling); waiting: acquire loads until the target,
then a CTA barrier; data other programs wrote is loaded with `.cg` (L2, not the incoherent L1).

The weights do not depend on the activations: before arriving at a barrier a program asks L2 for
every weight tile its next phase will read (PREFETCH=1: `cp.async.bulk.prefetch.L2`, the TMA
unit fetching while the threads go on), so HBM keeps streaming while the barrier resolves;
PREFETCH=2 issues them at the start of the current phase instead (two phases' weights in
flight), 3 as one `prefetch.global.L2` per 128-byte line (issued by the threads), 0 not at all.

Every program must be resident at once, or the barrier never completes: the grid is at most
the SM count and nothing else may run beside the kernel. A wait gives up after
BARRIER_PATIENCE polls and counts itself in `ChainWorkspace.timeouts`, so a broken barrier shows
as a count (and wrong results), not a hung GPU. The interpreter runs programs one after
another, so on the CPU either the grid is one program (each barrier already met when reached)
or each launch covers one phase (`phases_per_launch=1`, no barrier inside a launch).

docs/decode_megakernel.md: what to measure with it, and how attention would enter the kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .activation import silu_and_mul
from .fused_norm import fused_add_rmsnorm, rmsnorm
from .linear import _num_sms, linear
from .pdl import device_index

PHASES_PER_LAYER = 4  # qkv, o, gate/up, down
# Tokens per launch: one 16-wide MMA N side (tokens padded up to it).
MAX_TOKENS = 16
# Polls of the barrier counter (an L2 round trip each, ~0.5 us) before a program gives a wait up,
# counts it in `ChainWorkspace.timeouts` and stops waiting for the rest of the launch: a barrier
# that cannot complete (programs not all resident, a bug) then costs about a second and wrong
# results instead of a hung GPU. A met barrier takes microseconds.
BARRIER_PATIENCE = 1 << 21
# Bulk L2 prefetches per weight row and task: 8 x 16 rows = one per thread of 4 warps (fewer
# elements than threads would repeat each prefetch on several threads).
PREFETCH_CHUNKS = tl.constexpr(8)


class ChainConfig(NamedTuple):
    # Budget (Triton 3.6, sm_90a, Qwen3-0.6B's shapes, 4 warps): 237 registers without spills
    # and ~93 KB of shared memory at these values; block_k 512 spills; 8 stages of 256 (~126 KB)
    # and block_n 32 at 6 stages (~134 KB) still fit the 227 KB an SM has.
    block_n: int = 16  # weight rows per task: 256 qkv / 384 gate-up tasks, 97% balanced on 132
    block_k: int = 256  # must divide every K slice (qkv, gate/up: 1024; o: 1024; down: 1536)
    splits: int = 2  # K slices of o / down: 64 output tiles x 2 = 128 tasks on 132 programs
    num_stages: int = 6  # 5 x 8 KB of weights in flight per SM
    num_warps: int = 4
    # L2 prefetch of the next phase's weights: 0 off; 1 bulk (TMA) before arrival; 2 bulk at the
    # start of the phase before; 3 one prefetch per 128-byte line before arrival.
    prefetch: int = 1


DEFAULT_CONFIG = ChainConfig()


@triton.jit
def _prefetch_l2(ptrs):
    """One `prefetch.global.L2` per element of ptrs (each the start of a 128-byte line)."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;",
        "=r,l",
        [ptrs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _prefetch_l2_bulk(ptrs, num_bytes):
    """One `cp.async.bulk.prefetch.L2` (the TMA unit fetches, the thread goes on) per element of
    ptrs: num_bytes from each (16-byte aligned, a multiple of 16)."""
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
        "=r,l,r",
        [ptrs, num_bytes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _prefetch_tasks(
    pid,
    num_programs,
    w_ptr,  # [N, K], this layer's
    N: tl.constexpr,
    K: tl.constexpr,
    SPLITS: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BULK: tl.constexpr,
):
    """L2 prefetch of every weight tile this program's tasks of a phase will load: each row's K
    slice in PREFETCH_CHUNKS bulk prefetches (BN x 8 = one per thread at BN 16 and 4 warps), or
    one `prefetch.global.L2` per 128-byte line."""
    num_tasks: tl.constexpr = N // BN * SPLITS
    my_tasks = tl.cdiv(num_tasks - pid, num_programs)
    offs_n = tl.arange(0, BN)
    if BULK:
        CHUNK: tl.constexpr = K // SPLITS // PREFETCH_CHUNKS
        CHUNK_BYTES: tl.constexpr = CHUNK * w_ptr.dtype.element_ty.primitive_bitwidth // 8
        offs_chunk = tl.arange(0, PREFETCH_CHUNKS) * CHUNK
        num_bytes = tl.full((BN, PREFETCH_CHUNKS), CHUNK_BYTES, dtype=tl.int32)
        for t in range(my_tasks):
            task = pid + t * num_programs
            rows = task // SPLITS * BN + offs_n
            k = task % SPLITS * (K // SPLITS)
            _prefetch_l2_bulk(w_ptr + rows[:, None] * K + k + offs_chunk[None, :], num_bytes)
    else:
        K_STEPS: tl.constexpr = K // SPLITS // BK
        LINE: tl.constexpr = 128 * 8 // w_ptr.dtype.element_ty.primitive_bitwidth  # per line
        offs_line = tl.arange(0, BK // LINE) * LINE
        for i in range(my_tasks * K_STEPS):
            task = pid + i // K_STEPS * num_programs
            rows = task // SPLITS * BN + offs_n
            k = (task % SPLITS * K_STEPS + i % K_STEPS) * BK
            _prefetch_l2(w_ptr + rows[:, None] * K + k + offs_line[None, :])


@triton.jit
def _prefetch_phase(
    phase,
    pid,
    num_programs,
    w_qkv_ptr,
    w_o_ptr,
    w_gate_up_ptr,
    w_down_ptr,
    H: tl.constexpr,
    QKV: tl.constexpr,
    ATTN: tl.constexpr,
    INTER: tl.constexpr,
    SPLITS: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BULK: tl.constexpr,
    PHASES: tl.constexpr,
):
    layer = (phase // PHASES).to(tl.int64)
    kind = phase % PHASES
    if kind == 0:
        _prefetch_tasks(pid, num_programs, w_qkv_ptr + layer * QKV * H, QKV, H, 1, BN, BK, BULK)
    elif kind == 1:
        _prefetch_tasks(
            pid, num_programs, w_o_ptr + layer * H * ATTN, H, ATTN, SPLITS, BN, BK, BULK
        )
    elif kind == 2:
        w = w_gate_up_ptr + layer * 2 * INTER * H
        _prefetch_tasks(pid, num_programs, w, 2 * INTER, H, 1, BN, BK, BULK)
    else:
        w = w_down_ptr + layer * H * INTER
        _prefetch_tasks(pid, num_programs, w, H, INTER, SPLITS, BN, BK, BULK)


@triton.jit
def _grid_barrier(barrier_ptr, timeouts_ptr, target, patience):
    """Arrive, then wait until the arrival counter reaches target (see the module docstring), or
    until `patience` polls have failed: then count a timeout and return 0 (else `patience`).
    The arrival's own result tells the last arriver it need not poll; each poll is an acquire
    load, so the one that sees the target needs no fence after it."""
    tl.debug_barrier()  # the whole CTA's stores precede the arrival
    seen = tl.atomic_add(barrier_ptr, 1, sem="acq_rel", scope="gpu") + 1
    polls = 0
    while (seen < target) & (polls < patience):
        seen = tl.atomic_add(barrier_ptr, 0, sem="acquire", scope="gpu")
        polls += 1
    late = seen < target
    tl.atomic_add(timeouts_ptr, 1, mask=late, sem="relaxed", scope="gpu")
    tl.debug_barrier()  # the CTA's later loads follow the acquire
    return tl.where(late, 0, patience)


@triton.jit
def _row_rstd(
    res_ptr,  # [M, H]
    M,
    eps,
    H: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
):  # [BM] float32
    """1 / sqrt(mean(x^2) + eps) per row, as the RMSNorm kernel computes it."""
    offs_m = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    ssq = tl.zeros((BM,), dtype=tl.float32)
    for k in tl.static_range(0, H, BK):
        ptrs = res_ptr + offs_m[:, None] * H + k + offs_k[None, :]
        r = tl.load(ptrs, mask=offs_m[:, None] < M, other=0.0, cache_modifier=".cg")
        r = r.to(tl.float32)
        ssq += tl.sum(r * r, axis=1)
    return tl.math.rsqrt(ssq / H + eps)


@triton.jit
def _gemm_phase(
    pid,
    num_programs,
    x_ptr,  # X_MODE 0: [M, K]; 1: [M, K] residual to normalise; 2: [M, 2K] gate then up
    norm_w_ptr,  # [K], X_MODE 1 only
    w_ptr,  # [N, K]
    out_ptr,  # [M, N] w's dtype; or [SPLITS, M, N] float32 partial sums when ADD_RESIDUAL
    res_in_ptr,  # [M, N], ADD_RESIDUAL only: the residual the product is added to
    res_out_ptr,  # [M, N], ADD_RESIDUAL only: product + residual
    tile_counts_ptr,  # [N // BN] int32, ADD_RESIDUAL only: zero at the start of the phase
    M,
    eps,
    N: tl.constexpr,
    K: tl.constexpr,
    SPLITS: tl.constexpr,
    X_MODE: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,  # else out = the product
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """This program's tasks of one GEMM phase: out = x @ w^T, x transformed as it is loaded; with
    ADD_RESIDUAL, res_out = x @ w^T + res_in, over SPLITS K slices reduced by the last to end."""
    dtype = w_ptr.dtype.element_ty
    K_STEPS: tl.constexpr = K // SPLITS // BK
    num_tasks: tl.constexpr = N // BN * SPLITS
    my_tasks = tl.cdiv(num_tasks - pid, num_programs)  # 0 for pid >= num_tasks
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_mask = offs_m[:, None] < M
    if X_MODE == 1:
        rstd = _row_rstd(x_ptr, M, eps, K, BM, BK)
    acc = tl.zeros((BN, BM), dtype=tl.float32)  # a tile of out^T: weight rows on the M side
    for i in tl.range(0, my_tasks * K_STEPS, num_stages=NUM_STAGES):
        task = pid + i // K_STEPS * num_programs
        step = i % K_STEPS
        n_tile = task // SPLITS
        split = task % SPLITS
        k = (split * K_STEPS + step) * BK
        rows = n_tile * BN + offs_n
        w = tl.load(w_ptr + rows[:, None] * K + k + offs_k[None, :])
        x_ptrs = x_ptr + offs_m[:, None] * K + k + offs_k[None, :]
        if X_MODE == 0:
            x = tl.load(x_ptrs, mask=m_mask, other=0.0, cache_modifier=".cg")
        elif X_MODE == 1:  # the roundings of kernels/fused_norm.py
            r = tl.load(x_ptrs, mask=m_mask, other=0.0, cache_modifier=".cg")
            normed = (r.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32)
            nw = tl.load(norm_w_ptr + k + offs_k).to(tl.float32)
            x = (nw[None, :] * normed).to(dtype)
        else:  # the roundings of kernels/activation.py
            gu_ptrs = x_ptr + offs_m[:, None] * (2 * K) + k + offs_k[None, :]
            gate = tl.load(gu_ptrs, mask=m_mask, other=0.0, cache_modifier=".cg")
            up = tl.load(gu_ptrs + K, mask=m_mask, other=0.0, cache_modifier=".cg")
            gate = gate.to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            x = (silu * up.to(tl.float32)).to(dtype)
        acc = tl.dot(w, tl.trans(x), acc)
        if step == K_STEPS - 1:  # the task's epilogue
            y = tl.trans(acc)  # [BM, BN]
            out_cols = rows[None, :]
            tile = offs_m[:, None] * N + out_cols
            if ADD_RESIDUAL and SPLITS == 1:  # the whole K here: no partial sums to wait for
                res = tl.load(res_in_ptr + tile, mask=m_mask, other=0.0, cache_modifier=".cg")
                total = y.to(dtype).to(tl.float32) + res.to(tl.float32)
                tl.store(res_out_ptr + tile, total.to(dtype), mask=m_mask)
            elif ADD_RESIDUAL:
                parts = out_ptr + (split * M + offs_m[:, None]) * N + out_cols
                tl.store(parts, y, mask=m_mask)
                tl.debug_barrier()  # the whole tile is stored before the arrival
                arrived = tl.atomic_add(tile_counts_ptr + n_tile, 1, sem="acq_rel", scope="gpu")
                if arrived == SPLITS - 1:  # the last split: add up, in split order
                    tl.debug_barrier()
                    total = tl.load(out_ptr + tile, mask=m_mask, other=0.0, cache_modifier=".cg")
                    for s in tl.static_range(1, SPLITS):
                        total += tl.load(
                            out_ptr + s * M * N + tile, mask=m_mask, other=0.0, cache_modifier=".cg"
                        )
                    res = tl.load(res_in_ptr + tile, mask=m_mask, other=0.0, cache_modifier=".cg")
                    total = total.to(dtype).to(tl.float32) + res.to(tl.float32)
                    tl.store(res_out_ptr + tile, total.to(dtype), mask=m_mask)
                    tl.atomic_xchg(tile_counts_ptr + n_tile, 0, sem="relaxed", scope="gpu")
            else:
                tl.store(out_ptr + tile, y.to(dtype), mask=m_mask)
            acc = tl.zeros((BN, BM), dtype=tl.float32)


@triton.jit(do_not_specialize=["M", "first_phase", "last_phase", "num_layers"])
def _decode_chain_kernel(
    residual_ptr,  # [M, H], the first layer's residual stream (read only)
    out_ptr,  # [M, H], the last layer's residual stream out
    attn_ptr,  # [M, ATTN], the attention output every layer's o projection reads
    w_qkv_ptr,  # [L, QKV, H]
    w_o_ptr,  # [L, H, ATTN]
    w_gate_up_ptr,  # [L, 2 * INTER, H], gate rows then up rows
    w_down_ptr,  # [L, H, INTER]
    norm_w_ptr,  # [L, 2, H]: the input norm's weight, then the post-attention norm's
    qkv_ptr,  # [M, QKV] out (the next phase's input were attention here)
    gate_up_ptr,  # [M, 2 * INTER] scratch
    parts_ptr,  # [SPLITS, M, H] float32 scratch: o's, then down's split-K partial sums
    res_mid_ptr,  # [M, H] scratch: the residual after attention
    res_layer_ptr,  # [M, H] scratch: the residual between layers
    tile_counts_ptr,  # [H // BN] int32, zero between phases
    barrier_ptr,  # [1] int64, the grid barrier's arrival counter (only grows)
    timeouts_ptr,  # [1] int32, barrier waits given up (a broken barrier, not a hung GPU)
    M,
    eps,
    first_phase,  # this launch runs phases [first_phase, last_phase), 4 per layer
    last_phase,
    num_layers,
    patience,  # polls of the counter before a wait is given up
    H: tl.constexpr,
    QKV: tl.constexpr,
    ATTN: tl.constexpr,
    INTER: tl.constexpr,
    SPLITS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PREFETCH: tl.constexpr,
    PHASES: tl.constexpr,  # per layer: PHASES_PER_LAYER
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    # Read before this program's first arrival: see the module docstring.
    base = tl.load(barrier_ptr, volatile=True) // num_programs * num_programs
    num_arrivals = 0
    for phase in range(first_phase, last_phase):
        layer = phase // PHASES
        kind = phase % PHASES
        layer64 = layer.to(tl.int64)
        if PREFETCH == 2 and phase + 1 < last_phase:
            _prefetch_phase(
                phase + 1, pid, num_programs, w_qkv_ptr, w_o_ptr, w_gate_up_ptr, w_down_ptr,
                H, QKV, ATTN, INTER, SPLITS, BN, BK, True, PHASES,
            )  # fmt: skip
        res_in = res_layer_ptr  # this layer's input residual
        if layer == 0:
            res_in = residual_ptr
        if kind == 0:
            _gemm_phase(
                pid, num_programs, res_in, norm_w_ptr + layer64 * 2 * H,
                w_qkv_ptr + layer64 * QKV * H, qkv_ptr, res_in, res_in, tile_counts_ptr, M, eps,
                QKV, H, 1, 1, False, BM, BN, BK, NUM_STAGES,
            )  # fmt: skip
        elif kind == 1:
            _gemm_phase(
                pid, num_programs, attn_ptr, norm_w_ptr, w_o_ptr + layer64 * H * ATTN,
                parts_ptr, res_in, res_mid_ptr, tile_counts_ptr, M, eps,
                H, ATTN, SPLITS, 0, True, BM, BN, BK, NUM_STAGES,
            )  # fmt: skip
        elif kind == 2:
            _gemm_phase(
                pid, num_programs, res_mid_ptr, norm_w_ptr + layer64 * 2 * H + H,
                w_gate_up_ptr + layer64 * 2 * INTER * H, gate_up_ptr, res_mid_ptr, res_mid_ptr,
                tile_counts_ptr, M, eps,
                2 * INTER, H, 1, 1, False, BM, BN, BK, NUM_STAGES,
            )  # fmt: skip
        else:
            res_out = res_layer_ptr
            if layer == num_layers - 1:
                res_out = out_ptr
            _gemm_phase(
                pid, num_programs, gate_up_ptr, norm_w_ptr, w_down_ptr + layer64 * H * INTER,
                parts_ptr, res_mid_ptr, res_out, tile_counts_ptr, M, eps,
                H, INTER, SPLITS, 2, True, BM, BN, BK, NUM_STAGES,
            )  # fmt: skip
        if phase + 1 < last_phase:
            if PREFETCH == 1 or PREFETCH == 3:
                _prefetch_phase(
                    phase + 1, pid, num_programs, w_qkv_ptr, w_o_ptr, w_gate_up_ptr, w_down_ptr,
                    H, QKV, ATTN, INTER, SPLITS, BN, BK, PREFETCH == 1, PHASES,
                )  # fmt: skip
            num_arrivals += 1
            target = base + num_arrivals * num_programs
            patience = _grid_barrier(barrier_ptr, timeouts_ptr, target, patience)


class ChainWeights(NamedTuple):
    """Every layer's weights, stacked (one tensor per kind, contiguous)."""

    qkv: torch.Tensor  # [L, QKV, H]
    o: torch.Tensor  # [L, H, ATTN]
    gate_up: torch.Tensor  # [L, 2 * INTER, H], gate rows then up rows
    down: torch.Tensor  # [L, H, INTER]
    norm: torch.Tensor  # [L, 2, H]: input norm, post-attention norm


class ChainWorkspace(NamedTuple):
    """Scratch and synchronisation state of one token count and grid; reusable across launches
    (and CUDA-graph replays) of that shape, as the barrier needs."""

    num_programs: int
    qkv: torch.Tensor  # [M, QKV]
    gate_up: torch.Tensor  # [M, 2 * INTER]
    parts: torch.Tensor  # [SPLITS, M, H] float32
    res_mid: torch.Tensor  # [M, H]
    res_layer: torch.Tensor  # [M, H]
    tile_counts: torch.Tensor  # [H // block_n] int32
    barrier: torch.Tensor  # [1] int64
    timeouts: torch.Tensor  # [1] int32: nonzero after a broken barrier (results then wrong)


def make_workspace(
    m: int,
    weights: ChainWeights,
    num_programs: int | None = None,
    config: ChainConfig = DEFAULT_CONFIG,
) -> ChainWorkspace:
    """Workspace for m tokens; the grid defaults to one program per SM (one on the CPU)."""
    device = weights.qkv.device
    if num_programs is None:
        num_programs = _num_sms(device_index(weights.qkv)) if device.type == "cuda" else 1
    _, qkv, h = weights.qkv.shape
    inter2 = weights.gate_up.shape[1]
    dtype = weights.qkv.dtype
    return ChainWorkspace(
        num_programs=num_programs,
        qkv=torch.empty((m, qkv), dtype=dtype, device=device),
        gate_up=torch.empty((m, inter2), dtype=dtype, device=device),
        parts=torch.empty((config.splits, m, h), dtype=torch.float32, device=device),
        res_mid=torch.empty((m, h), dtype=dtype, device=device),
        res_layer=torch.empty((m, h), dtype=dtype, device=device),
        tile_counts=torch.zeros(h // config.block_n, dtype=torch.int32, device=device),
        barrier=torch.zeros(1, dtype=torch.int64, device=device),
        timeouts=torch.zeros(1, dtype=torch.int32, device=device),
    )


def decode_chain(
    residual: torch.Tensor,  # [M, H], M <= MAX_TOKENS
    attn: torch.Tensor,  # [M, ATTN]
    weights: ChainWeights,
    eps: float,
    workspace: ChainWorkspace,
    *,
    out: torch.Tensor | None = None,  # [M, H]; may be `residual` itself
    config: ChainConfig = DEFAULT_CONFIG,
    phases_per_launch: int | None = None,  # None: every phase in one launch
    barrier_patience: int = BARRIER_PATIENCE,
) -> torch.Tensor:  # [M, H], the residual stream after the last layer
    """The layer chain of bench_layer_chain.py over all L layers: per layer, qkv on the input
    norm; o on attn, added to the residual; gate/up on the post-attention norm, SiLU-and-multiply,
    down, added to the residual. `phases_per_launch` splits the chain over several launches
    (each layer is 4 phases), for the interpreter's sake."""
    w = weights
    num_layers, qkv_n, h = w.qkv.shape
    attn_n, inter = w.o.shape[2], w.down.shape[2]
    m = residual.shape[0]
    dtype = residual.dtype
    assert dtype in (torch.float16, torch.bfloat16, torch.float32), dtype
    assert 1 <= m <= MAX_TOKENS and residual.shape == (m, h), residual.shape
    assert attn.shape == (m, attn_n) and attn.dtype == dtype, (attn.shape, attn.dtype)
    shapes = {
        "o": (num_layers, h, attn_n),
        "gate_up": (num_layers, 2 * inter, h),
        "down": (num_layers, h, inter),
        "norm": (num_layers, 2, h),
    }
    for name, tensor in zip(ChainWeights._fields, w):
        assert tensor.dtype == dtype and tensor.is_contiguous(), (name, tensor.dtype)
        assert name not in shapes or tensor.shape == shapes[name], (name, tensor.shape)
    assert residual.is_contiguous() and attn.is_contiguous()
    bn, bk, splits = config.block_n, config.block_k, config.splits
    for n, k, s in ((qkv_n, h, 1), (h, attn_n, splits), (2 * inter, h, 1), (h, inter, splits)):
        assert n % bn == 0 and k % (s * bk) == 0, (n, k, s, config)
    ws = workspace
    assert ws.parts.shape == (splits, m, h) and ws.tile_counts.shape == (h // bn,), config
    assert ws.qkv.shape == (m, qkv_n) and ws.gate_up.shape == (m, 2 * inter)
    if out is None:
        out = torch.empty_like(residual)
    assert out.shape == (m, h) and out.dtype == dtype and out.is_contiguous()
    num_phases = PHASES_PER_LAYER * num_layers
    per_launch = phases_per_launch or num_phases
    if residual.is_cuda:
        sms = _num_sms(device_index(residual))
        assert ws.num_programs <= sms, (ws.num_programs, sms)  # all resident, or no barrier ends
    else:  # the interpreter runs programs in turn: a spinning one waits for nothing, at length
        assert ws.num_programs == 1 or per_launch == 1 or barrier_patience <= 100, ws.num_programs
    prefetch = config.prefetch if residual.is_cuda else 0  # inline PTX: not on the interpreter
    if prefetch in (1, 2):  # bulk prefetches: 16-byte aligned chunks, a multiple of 16 bytes
        for k, s in ((h, 1), (attn_n, splits), (inter, splits)):
            assert (k // s // PREFETCH_CHUNKS.value * residual.element_size()) % 16 == 0, (k, s)
    for first in range(0, num_phases, per_launch):
        _decode_chain_kernel[(ws.num_programs,)](
            residual_ptr=residual,
            out_ptr=out,
            attn_ptr=attn,
            w_qkv_ptr=w.qkv,
            w_o_ptr=w.o,
            w_gate_up_ptr=w.gate_up,
            w_down_ptr=w.down,
            norm_w_ptr=w.norm,
            qkv_ptr=ws.qkv,
            gate_up_ptr=ws.gate_up,
            parts_ptr=ws.parts,
            res_mid_ptr=ws.res_mid,
            res_layer_ptr=ws.res_layer,
            tile_counts_ptr=ws.tile_counts,
            barrier_ptr=ws.barrier,
            timeouts_ptr=ws.timeouts,
            M=m,
            eps=eps,
            first_phase=first,
            last_phase=min(first + per_launch, num_phases),
            num_layers=num_layers,
            patience=barrier_patience,
            H=h,
            QKV=qkv_n,
            ATTN=attn_n,
            INTER=inter,
            SPLITS=splits,
            BM=MAX_TOKENS,
            BN=bn,
            BK=bk,
            NUM_STAGES=config.num_stages,
            PREFETCH=prefetch,
            PHASES=PHASES_PER_LAYER,
            num_warps=config.num_warps,
        )
    return out


def per_kernel_chain(
    residual: torch.Tensor,  # [M, H]
    attn: torch.Tensor,  # [M, ATTN]
    weights: ChainWeights,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (the residual after the last layer, its qkv)
    """What `decode_chain` computes, through the engine's per-layer kernels as
    bench_layer_chain.py's triton modes launch them (split-K partial sums into the fused add +
    RMSNorm): the tests' oracle for the one-launch kernel."""
    w, res = weights, residual
    h = rmsnorm(res, w.norm[0, 0], eps)
    num_layers = w.qkv.shape[0]
    for layer in range(num_layers):
        qkv = linear(h, w.qkv[layer])
        o = linear(attn, w.o[layer], partials=True)
        h, res = fused_add_rmsnorm(o, res, w.norm[layer, 1], eps)
        act = silu_and_mul(linear(h, w.gate_up[layer]))
        down = linear(act, w.down[layer], partials=True)
        # The next layer's input norm (the last layer's h is never used).
        h, res = fused_add_rmsnorm(down, res, w.norm[min(layer + 1, num_layers - 1), 0], eps)
    return res, qkv
