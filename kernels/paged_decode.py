"""Split-K paged decode attention (flash-decoding) with GQA head packing.

One query token per sequence. Program (b, kv_head, split) loads each K/V tile of its context
partition once and scores it against all query heads of the GQA group at once: the group is packed
into the M dimension of `tl.dot`, padded to 16 rows. The grid is (kv_heads, batch, grid_splits),
fixed by the batch size and the block-table width, never by the data, so the launch can be
captured in a CUDA graph; how many splits a sequence uses (up to max_num_splits) is decided on the
GPU from its length, split program s runs splits s, s + grid_splits, ..., and programs without
work exit at once. A second kernel merges the partial results with
their log-sum-exp (the split rule and the reduce: kernels/decode_split.py; the per-tile steps:
kernels/decode_tiles.py). When max_num_splits is 1 (large batches already fill the GPU) the main kernel
normalizes and writes the output itself: no reduce launch, no partial buffers.

With `row_order` (a permutation of the rows, longest context first) program b takes row
row_order[b]: the longest rows start first instead of forming the grid's tail. Each row's result
does not depend on the order.

The grid's first (fastest-varying) dimension is the KV head: the programs of one row's heads are
dispatched side by side and read the interleaved heads of the same cache blocks at about the same
time, which the memory serves faster than one head of many rows at a time
(`benchmarks/bench_decode_varlen.py` compares the two through `_decode_attention`'s `heads_first`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_split import (
    _default_split,
    _num_splits_and_partition,
    _paged_decode_reduce_kernel,
)
from .decode_tiles import _attend_keys, _load_kv_tile, _with_newest_key
from .pdl import pdl_enabled, pdl_launch_dependents, pdl_start, pdl_wait

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    seq_lens_ptr,  # [B] int32
    block_tables_ptr,  # [B, max_blocks] int32
    row_order_ptr,  # [B] int32, read only if ROW_ORDER
    part_out_ptr,  # [B, num_heads, max_num_splits, head_dim] float32; unused if SINGLE_SPLIT
    part_lse_ptr,  # [B, num_heads, max_num_splits] float32, log2 units; unused if SINGLE_SPLIT
    out_ptr,  # [B, num_heads, head_dim]; written only if SINGLE_SPLIT
    max_num_splits,  # runtime: a new batch size must not mean a new compile
    qk_scale,  # softmax scale * log2(e)
    stride_q_b,
    stride_q_h,
    stride_out_b,
    stride_out_h,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    stride_bt_b,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # >= 16 for tl.dot
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # KV cache block size
    BLOCK_N: tl.constexpr,
    MIN_PARTITION: tl.constexpr,
    SELECT_LOOKUP: tl.constexpr,  # see block_table.tile_row_offsets (BLOCK_N > BLOCK_SIZE only)
    SINGLE_SPLIT: tl.constexpr,  # max_num_splits == 1: write the final output, no reduce
    ROW_ORDER: tl.constexpr,  # program b takes row row_order[b]
    HEADS_FIRST: tl.constexpr,  # grid (kv_heads, batch, splits) instead of (batch, kv_heads, ..)
    PDL: tl.constexpr,  # launched as a programmatic dependent (kernels/pdl.py)
    EARLY_LOADS: tl.constexpr,  # the first key tile (but the newest key) read before the wait
):
    if EARLY_LOADS:
        pdl_launch_dependents(PDL)
    else:
        pdl_start(PDL)
    if HEADS_FIRST:
        kv_head = tl.program_id(0)
        b = tl.program_id(1)
        num_kv_heads = tl.num_programs(0)
    else:
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        num_kv_heads = tl.num_programs(1)
    if ROW_ORDER:
        b = tl.load(row_order_ptr + b)
    seq_len = tl.load(seq_lens_ptr + b)
    if SINGLE_SPLIT:
        # The whole context as one split (a loop of one constant trip, which the compiler
        # removes); a seq_len == 0 padding row runs no key tile and writes zeros.
        first_split, num_splits, split_step, partition = 0, 1, 1, seq_len
    else:
        num_splits, partition = _num_splits_and_partition(
            seq_len, max_num_splits, MIN_PARTITION, BLOCK_N
        )
        if tl.program_id(2) >= num_splits:  # also every split of a seq_len == 0 padding row
            if EARLY_LOADS:
                pdl_wait(PDL)  # every program waits before it ends: the chain's guarantee
            return
        # The grid may hold fewer split programs than a long row has splits: each takes every
        # num_programs(2)-th.
        first_split, split_step = tl.program_id(2), tl.num_programs(2)
    k_first = seq_len  # unused without EARLY_LOADS
    v_first = seq_len
    if EARLY_LOADS:
        bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt_b
        head_off = kv_head.to(tl.int64) * stride_cache_head
        # The step's arrays were uploaded and the earlier steps' keys stored before this step's
        # first kernel ran; only the row's newest key (and q) come from the kernel before this
        # one. So the first tile's other keys are read while that kernel still runs.
        first_start = first_split * partition
        first_end = tl.minimum(first_start + partition, seq_len)
        k_first, v_first = _load_kv_tile(
            k_cache_ptr,
            v_cache_ptr,
            bt_row,
            head_off,
            first_start,
            tl.minimum(first_end, seq_len - 1),
            stride_cache_block,
            stride_cache_tok,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_SIZE,
            BLOCK_N,
            SELECT_LOOKUP,
        )
        pdl_wait(PDL)
        k_first, v_first = _with_newest_key(
            k_first,
            v_first,
            k_cache_ptr,
            v_cache_ptr,
            bt_row,
            head_off,
            first_start,
            first_end,
            seq_len,
            stride_cache_block,
            stride_cache_tok,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_SIZE,
            BLOCK_N,
        )
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [GROUP_PAD, BLOCK_D]
    # (again for EARLY_LOADS: here, after q, they keep the default's instruction order)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt_b
    head_off = kv_head.to(tl.int64) * stride_cache_head
    part_rows = (b * (GROUP * num_kv_heads) + heads).to(tl.int64) * max_num_splits
    for split in range(first_split, num_splits, split_step):
        start = split * partition
        acc, m_i, l_i = _attend_keys(
            q,
            k_cache_ptr,
            v_cache_ptr,
            bt_row,
            head_off,
            start,
            tl.minimum(start + partition, seq_len),
            qk_scale,
            stride_cache_block,
            stride_cache_tok,
            k_first,
            v_first,
            split == first_split,
            HEAD_DIM,
            GROUP_PAD,
            BLOCK_D,
            BLOCK_SIZE,
            BLOCK_N,
            SELECT_LOOKUP,
            EARLY_LOADS,
        )
        if SINGLE_SPLIT:  # the final output: l_i > 0 for a real row, 0 for an empty one
            out_off = b.to(tl.int64) * stride_out_b + heads[:, None] * stride_out_h
            tl.store(
                out_ptr + out_off + offs_d[None, :],
                (acc / tl.maximum(l_i, 1e-30)[:, None]).to(out_ptr.dtype.element_ty),
                mask=g_mask[:, None] & d_mask[None, :],
            )
        else:  # every split holds >= 1 key, so l_i > 0 for the real rows
            tl.store(part_lse_ptr + part_rows + split, m_i + tl.log2(l_i), mask=g_mask)
            tl.store(
                part_out_ptr + (part_rows + split)[:, None] * HEAD_DIM + offs_d[None, :],
                acc / l_i[:, None],
                mask=g_mask[:, None] & d_mask[None, :],
            )


def decode_attention(
    q: torch.Tensor,  # [B, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    seq_lens: torch.Tensor,  # [B] int32; 0 marks a padding row
    block_tables: torch.Tensor,  # [B, max_blocks] int32, padded with -1
    scale: float,
    out: torch.Tensor | None = None,  # [B, num_heads, head_dim]
    *,
    max_num_splits: int | None = None,
    min_partition: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int | None = None,
    row_order: torch.Tensor | None = None,  # [B] int32, a permutation of range(B)
    early_loads: bool = False,
) -> torch.Tensor:
    """Attention of one query per sequence (position seq_lens[b] - 1) over its paged context.

    The keyword-only arguments tune the split: `max_num_splits` and `min_partition` (fewest tokens
    per split; both default from the batch size and the block-table width, so a fixed-shape call
    has a fixed grid), the key tile `block_n` and the launch's `num_warps` / `num_stages` (default
    2 with one split, 3 with several); `row_order` (longest context first) is the order the
    programs take the rows in. `early_loads` (the engine's decode-only steps take it,
    layers/attention.py): see `_decode_attention`.
    """
    return _decode_attention(
        q,
        k_cache,
        v_cache,
        seq_lens,
        block_tables,
        scale,
        out,
        max_num_splits=max_num_splits,
        min_partition=min_partition,
        block_n=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
        row_order=row_order,
        early_loads=early_loads,
    )


def _decode_attention(
    q: torch.Tensor,  # [B, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    seq_lens: torch.Tensor,  # [B] int32; 0 marks a padding row
    block_tables: torch.Tensor,  # [B, max_blocks] int32, padded with -1
    scale: float,
    out: torch.Tensor | None = None,  # [B, num_heads, head_dim]
    *,
    max_num_splits: int | None = None,
    min_partition: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int | None = None,
    row_order: torch.Tensor | None = None,  # [B] int32, a permutation of range(B)
    select_lookup: bool = True,
    heads_first: bool = True,
    grid_splits: int | None = None,
    early_loads: bool = False,
) -> torch.Tensor:
    """`decode_attention` with the variants only the benchmarks' sweeps compare: the block-table
    lookup of a key tile wider than a cache block (`select_lookup`, see
    block_table.tile_row_offsets), the grid order (`heads_first=False`: the rows in the
    grid's fastest dimension instead of the KV heads), the grid's split programs per (row,
    KV head) (`grid_splits`, at most max_num_splits; by default _default_split's, or
    max_num_splits where that is given), and `early_loads`: each program reads its first key
    tile, all but the row's newest key, before its PDL wait (that key and q after it), which is
    only right where the kernel before this one writes no other key of these rows (a decode
    step: the q/k-norm + rotary kernel stores the new token's K/V; the engine's decode-only
    steps take it, benchmarks/README.md has the figures)."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert q.stride(2) == 1 and num_heads % num_kv_heads == 0
    assert seq_lens.shape == (batch,) and seq_lens.dtype == torch.int32
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    if row_order is not None:
        assert row_order.shape == (batch,) and row_order.dtype == torch.int32, row_order.shape
        assert row_order.is_contiguous()
    assert block_size % block_n == 0 or block_n % block_size == 0
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * block_size
    if max_num_splits is None:
        max_num_splits, default_partition, default_grid = _default_split(
            batch, num_kv_heads, max_context, q.device
        )
        if min_partition is None:
            min_partition = max(default_partition, block_n)
        else:  # never more than min_partition-sized pieces
            max_num_splits = max(1, min(max_num_splits, triton.cdiv(max_context, min_partition)))
        if grid_splits is None:
            grid_splits = default_grid
    elif min_partition is None:
        min_partition = 256
    grid_splits = max_num_splits if grid_splits is None else min(grid_splits, max_num_splits)
    assert min_partition % block_n == 0, (min_partition, block_n)
    single_split = max_num_splits == 1
    if num_stages is None:
        # One split: fewer stages leave room for more programs per SM (faster from ~128 rows,
        # never slower in the sweep).
        num_stages = 2 if single_split else 3
    if single_split:  # the kernel writes `out` itself; the partial pointers are never read
        part_out = part_lse = out
    else:
        part_out = torch.empty(
            (batch, num_heads, max_num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(
            (batch, num_heads, max_num_splits), dtype=torch.float32, device=q.device
        )
    block_d = triton.next_power_of_2(head_dim)
    grid = (num_kv_heads, batch) if heads_first else (batch, num_kv_heads)
    pdl = pdl_enabled(q)
    _paged_decode_kernel[(*grid, grid_splits)](
        q_ptr=q,
        k_cache_ptr=k_cache,
        v_cache_ptr=v_cache,
        seq_lens_ptr=seq_lens,
        block_tables_ptr=block_tables,
        row_order_ptr=row_order if row_order is not None else seq_lens,
        part_out_ptr=part_out,
        part_lse_ptr=part_lse,
        out_ptr=out,
        max_num_splits=max_num_splits,
        qk_scale=scale * _LOG2E,
        stride_q_b=q.stride(0),
        stride_q_h=q.stride(1),
        stride_out_b=out.stride(0),
        stride_out_h=out.stride(1),
        stride_cache_block=k_cache.stride(0),
        stride_cache_tok=k_cache.stride(1),
        stride_cache_head=k_cache.stride(2),
        stride_bt_b=block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        MIN_PARTITION=min_partition,
        SELECT_LOOKUP=select_lookup,
        SINGLE_SPLIT=single_split,
        ROW_ORDER=row_order is not None,
        HEADS_FIRST=heads_first,
        PDL=pdl,
        EARLY_LOADS=early_loads,
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=pdl,
    )
    if single_split:
        return out
    _paged_decode_reduce_kernel[(batch, num_heads)](
        out_ptr=out,
        part_out_ptr=part_out,
        part_lse_ptr=part_lse,
        seq_lens_ptr=seq_lens,
        max_num_splits=max_num_splits,
        stride_out_b=out.stride(0),
        stride_out_h=out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        SPLIT_CHUNK=min(64, triton.next_power_of_2(max_num_splits)),
        MIN_PARTITION=min_partition,
        PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )
    return out
