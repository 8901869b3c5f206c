"""One decode program's walk over its keys: a paged K/V tile loaded through the block table
(`_load_kv_tile`), one online-softmax step over it (`_attend_tile`), the row's newest key patched
into a tile read before the PDL wait (`_with_newest_key`), and the loop over a key range
(`_attend_keys`). kernels/paged_decode.py's kernel is built from them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .block_table import tile_row_offsets


@triton.jit
def _load_kv_tile(
    k_cache_ptr,
    v_cache_ptr,
    bt_row,  # this row's block-table row
    head_off,  # kv_head * stride_cache_head, int64
    tile_start,
    end,  # keys [tile_start, min(tile_start + BLOCK_N, end)); zeros past end
    stride_cache_block,
    stride_cache_tok,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SELECT_LOOKUP: tl.constexpr,
):  # -> k, v [BLOCK_N, BLOCK_D]
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = tile_start + tl.arange(0, BLOCK_N) < end
    rows = tile_row_offsets(
        bt_row,
        tile_start,
        end,
        stride_cache_block,
        stride_cache_tok,
        BLOCK_SIZE,
        BLOCK_N,
        True,
        SELECT_LOOKUP,
    )
    kv_off = head_off + rows[:, None] + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    kv_mask = n_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _attend_tile(q, k, v, n_mask, acc, m_i, l_i, qk_scale):
    # One key tile of the online softmax (log2 units); keys outside n_mask are not seen.
    s = tl.dot(q, tl.trans(k)) * qk_scale  # [GROUP_PAD, BLOCK_N]
    s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _with_newest_key(
    k,  # [BLOCK_N, BLOCK_D], the tile at tile_start without the row's newest key
    v,
    k_cache_ptr,
    v_cache_ptr,
    bt_row,
    head_off,
    tile_start,
    end,
    seq_len,
    stride_cache_block,
    stride_cache_tok,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # -> k, v with the row's newest key (position seq_len - 1) if it falls in the tile
    newest = seq_len - 1
    tile_end = tl.minimum(tile_start + BLOCK_N, end)
    here = (newest >= tile_start) & (newest < tile_end)
    block = tl.load(bt_row + newest // BLOCK_SIZE, mask=here, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    off = head_off + block * stride_cache_block + (newest % BLOCK_SIZE) * stride_cache_tok + offs_d
    pos = newest + offs_d * 0  # `here` per lane: Triton's interpreter takes no scalar in a mask
    mask = (offs_d < HEAD_DIM) & (pos >= tile_start) & (pos < tile_end)
    k_new = tl.load(k_cache_ptr + off, mask=mask, other=0.0)
    v_new = tl.load(v_cache_ptr + off, mask=mask, other=0.0)
    is_newest = (tile_start + tl.arange(0, BLOCK_N) == newest)[:, None]
    return tl.where(is_newest, k_new[None, :], k), tl.where(is_newest, v_new[None, :], v)


@triton.jit
def _attend_keys(
    q,  # [GROUP_PAD, BLOCK_D]
    k_cache_ptr,
    v_cache_ptr,
    bt_row,  # this row's block-table row
    head_off,  # kv_head * stride_cache_head, int64
    start,
    end,  # keys [start, end)
    qk_scale,
    stride_cache_block,
    stride_cache_tok,
    k_first,  # with EARLY_LOADS: the tile at `start`, loaded before the PDL wait
    v_first,
    use_first,  # with EARLY_LOADS: whether k_first / v_first are this range's first tile
    HEAD_DIM: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SELECT_LOOKUP: tl.constexpr,
    EARLY_LOADS: tl.constexpr,
):  # -> (acc [GROUP_PAD, BLOCK_D] unnormalized, m_i, l_i [GROUP_PAD]), log2 units
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    loop_start = start
    if EARLY_LOADS:
        if use_first & (start < end):
            acc, m_i, l_i = _attend_tile(
                q, k_first, v_first, start + offs_n < end, acc, m_i, l_i, qk_scale
            )
        loop_start = tl.where(use_first, start + BLOCK_N, start)
    for tile_start in range(loop_start, end, BLOCK_N):
        k, v = _load_kv_tile(
            k_cache_ptr,
            v_cache_ptr,
            bt_row,
            head_off,
            tile_start,
            end,
            stride_cache_block,
            stride_cache_tok,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_SIZE,
            BLOCK_N,
            SELECT_LOOKUP,
        )
        acc, m_i, l_i = _attend_tile(q, k, v, tile_start + offs_n < end, acc, m_i, l_i, qk_scale)
    return acc, m_i, l_i
