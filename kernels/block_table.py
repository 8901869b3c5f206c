"""Triton helper shared by the attention kernels: cache row offsets of a key tile (block table)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_row_offsets(
    bt_row,  # pointer to this sequence's block-table row, int32
    tile_start,  # first key position of the tile (a multiple of BLOCK_N)
    limit,  # keys at positions >= limit are not read (only used when MASKED)
    stride_cache_block,
    stride_cache_tok,
    BLOCK_SIZE: tl.constexpr,  # KV cache block size
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    SELECT_LOOKUP: tl.constexpr,
):  # -> [BLOCK_N] int64 element offsets of the tile's rows (add kv_head * stride_head + d)
    offs_n = tl.arange(0, BLOCK_N)
    first = tile_start // BLOCK_SIZE
    if BLOCK_N <= BLOCK_SIZE:
        # BLOCK_N divides BLOCK_SIZE and tile_start is a multiple of BLOCK_N: one block per tile.
        block = tl.load(bt_row + first).to(tl.int64)
        in_block = tile_start % BLOCK_SIZE + offs_n
    elif SELECT_LOOKUP:
        # BLOCK_N // BLOCK_SIZE uniform scalar loads, spread over the rows with selects: no
        # per-row gather from the block table on the way to the K/V loads.
        block = tl.zeros([BLOCK_N], dtype=tl.int64)
        for j in tl.static_range(BLOCK_N // BLOCK_SIZE):
            if MASKED:
                b_j = tl.load(bt_row + first + j, mask=tile_start + j * BLOCK_SIZE < limit, other=0)
            else:
                b_j = tl.load(bt_row + first + j)
            block = tl.where(offs_n // BLOCK_SIZE == j, b_j.to(tl.int64), block)
        in_block = offs_n % BLOCK_SIZE
    else:
        # one block-table entry per row (a gather)
        pos = tile_start + offs_n
        if MASKED:
            block = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos < limit, other=0).to(tl.int64)
        else:
            block = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
        in_block = offs_n % BLOCK_SIZE
    return block * stride_cache_block + in_block * stride_cache_tok
