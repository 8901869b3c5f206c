"""Varlen causal flash attention of new query tokens over their paged context (prefix + new tokens).

One kernel covers plain prefill, prefill after a prefix-cache hit and chunked prefill: query token i
of sequence b sits at position seq_lens[b] - q_len_b + i and attends to keys 0..position, all read
from the paged cache through the block table. The query heads of a GQA group are packed into the M
dimension of the tile (row r = token r // GROUP, head r % GROUP), so each K/V tile is loaded once
per group. Online softmax in base 2, O(N) memory. Key tiles that every row sees completely run
without masks; only the tiles on the causal diagonal are masked.

A step replayed from a CUDA graph has a fixed grid: it passes a tile table instead
(`build_tile_table`), one (row, query tile) entry per program, heaviest first, -1 past the end, and
every row of the step, decodes included, is a "prefill" row (a decode is a one-token query).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from .block_table import tile_row_offsets

_LOG2E = 1.4426950408889634


# A step's prefill rows follow its decode rows, so seq_lens often starts at an unaligned offset:
# not specializing on its alignment keeps that from compiling a second variant mid-run (tiles_ptr
# is seq_lens when there is no tile table).
@triton.jit(do_not_specialize_on_alignment=["seq_lens_ptr", "tiles_ptr"])
def _flash_prefill_kernel(
    q_ptr,  # [T, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    out_ptr,  # [T, num_heads, head_dim]
    cu_seqlens_q_ptr,  # [B+1] int32
    seq_lens_ptr,  # [B] int32
    block_tables_ptr,  # [B, max_blocks] int32
    tiles_ptr,  # [num programs along dim 1] int32 (row << 16 | query tile), < 0: none; TILED
    qk_scale,  # softmax scale * log2(e)
    stride_q_t,
    stride_q_h,
    stride_out_t,
    stride_out_h,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    stride_bt_b,
    GROUP: tl.constexpr,  # query heads per KV head, packed into the M dimension
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # KV cache block size
    BLOCK_M: tl.constexpr,  # rows = tokens * GROUP (+ unused rows when GROUP doesn't divide it)
    BLOCK_N: tl.constexpr,
    TOKENS_PER_TILE: tl.constexpr,  # BLOCK_M // GROUP
    SELECT_LOOKUP: tl.constexpr,  # see block_table.tile_row_offsets (BLOCK_N > BLOCK_SIZE only)
    TILED: tl.constexpr,  # the (row, query tile) of a program comes from tiles_ptr
):
    kv_head = tl.program_id(0)
    if TILED:
        entry = tl.load(tiles_ptr + tl.program_id(1))
        if entry < 0:
            return
        b = entry >> 16
        tile = entry & 0xFFFF
    else:
        b = tl.program_id(1)
        # Heaviest (last, longest-context) query tiles first: the grid's slowest dimension is
        # launched last, so reverse it to even out the causal triangle's tail.
        tile = tl.num_programs(2) - 1 - tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    m0 = tile * TOKENS_PER_TILE
    if m0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len  # cached prefix before the new tokens

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = m0 + offs_m // GROUP  # [BLOCK_M] token index within the sequence's new tokens
    head = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m < TOKENS_PER_TILE * GROUP) & (tok < q_len)
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )  # [BLOCK_M, HEAD_DIM]
    q_pos = ctx_len + tok  # [BLOCK_M] position in the context

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt_b
    head_off = kv_head.to(tl.int64) * stride_cache_head

    # Keys below the tile's first position are visible to every row: no masks.
    full_end = ((ctx_len + m0) // BLOCK_N) * BLOCK_N
    for tile_start in range(0, full_end, BLOCK_N):
        rows = tile_row_offsets(
            bt_row,
            tile_start,
            seq_len,
            stride_cache_block,
            stride_cache_tok,
            BLOCK_SIZE,
            BLOCK_N,
            False,
            SELECT_LOOKUP,
        )
        kv_off = head_off + rows[:, None] + offs_d[None, :]  # [BLOCK_N, HEAD_DIM]
        k = tl.load(k_cache_ptr + kv_off)
        v = tl.load(v_cache_ptr + kv_off)
        qk = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    # The causal diagonal: keys up to the tile's last position (or the context's end).
    diag_end = tl.minimum(ctx_len + m0 + TOKENS_PER_TILE, seq_len)
    for tile_start in range(full_end, diag_end, BLOCK_N):
        key_pos = tile_start + offs_n
        n_mask = key_pos < seq_len
        rows = tile_row_offsets(
            bt_row,
            tile_start,
            seq_len,
            stride_cache_block,
            stride_cache_tok,
            BLOCK_SIZE,
            BLOCK_N,
            True,
            SELECT_LOOKUP,
        )
        kv_off = head_off + rows[:, None] + offs_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        visible = (key_pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        # Every row sees key full_end <= its position in the first diagonal tile, so m_new is
        # finite from there on.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    acc = acc / l_i[:, None]
    out_rows = (q_start + tok).to(tl.int64)
    tl.store(
        out_ptr + out_rows[:, None] * stride_out_t + head[:, None] * stride_out_h + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None],
    )


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _default_config(
    block_size: int, num_tiles_at_128: int, device: torch.device
) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages), from tile sweeps on an H100 (bf16, d=128;
    bench_prefill_attention.py --sweep; the figures are in benchmarks/README.md).

    16-token cache blocks: 128 packed rows with a narrow key tile (32) and 8 warps won (lowest
    register pressure per warp, 3-stage cp.async prefetch of K/V). Blocks >= 64 tokens: 64 rows x
    64 keys, one block lookup per key tile. When 128-row tiles would leave SMs idle (a chunk of a
    few hundred new tokens over a long prefix, short prompts), 64-row tiles double the programs.
    """
    if device.type != "cuda":
        return 64, 32, 4, 1
    if num_tiles_at_128 < 2 * _num_sms(device) or block_size >= 64:
        return 64, 64, 4, 3
    return 128, 32, 8, 3


def tile_config(
    block_size: int, group: int, num_kv_heads: int, num_tokens: int, device: torch.device
) -> tuple[int, int, int, int]:
    """The tile configuration of a tile-table launch over up to num_tokens query tokens (fixed
    per CUDA graph); its block_m // group tokens per tile is what `build_tile_table` needs."""
    num_tiles_at_128 = num_kv_heads * triton.cdiv(max(num_tokens, 1) * group, 128)
    return _default_config(block_size, num_tiles_at_128, device)


def max_tiles(num_tokens: int, num_rows: int, tokens_per_tile: int) -> int:
    """Most tile-table entries num_tokens tokens in num_rows rows can need."""
    return triton.cdiv(num_tokens, tokens_per_tile) + num_rows


def build_tile_table(
    query_start_loc: np.ndarray,  # [B + 1], starting at 0
    seq_lens: np.ndarray,  # [B]
    tokens_per_tile: int,
    out: np.ndarray,  # [max_tiles] int32
) -> int:
    """Fill `out` with one (row << 16 | query tile) entry per query tile of every row, the
    tiles with the most keys first (they finish last), then -1. Returns the number of tiles."""
    q_lens = np.diff(query_start_loc).astype(np.int64)
    counts = -(-q_lens // tokens_per_tile)
    n = int(counts.sum())
    if n > out.shape[0] or len(q_lens) > 1 << 15 or int(counts.max(initial=0)) > 1 << 16:
        raise ValueError(f"{n} query tiles in {len(q_lens)} rows do not fit the tile table")
    rows = np.repeat(np.arange(len(q_lens)), counts)
    first = np.cumsum(counts) - counts
    tiles = np.arange(n) - np.repeat(first, counts)
    keys = (seq_lens[rows] - q_lens[rows]) + np.minimum((tiles + 1) * tokens_per_tile, q_lens[rows])
    order = np.argsort(-keys, kind="stable")
    out[:n] = (rows[order] << 16) | tiles[order]
    out[n:] = -1
    return n


def prefill_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,  # [B+1] int32
    seq_lens: torch.Tensor,  # [B] int32, whole context (cached prefix + new tokens)
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    max_seqlen_q: int,
    out: torch.Tensor | None = None,  # [T, num_heads, head_dim]
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tiles: torch.Tensor | None = None,  # [max_tiles] int32, from build_tile_table
) -> torch.Tensor:
    """Causal attention of the new tokens over their sequence's whole paged context.

    The new tokens' K/V must already be in the cache. The keyword-only arguments override the tile
    configuration (benchmarks and tests). With `tiles` the grid is fixed by the table's length (a
    CUDA graph's step): its entries name the (row, query tile) of each program, built with the
    tokens per tile of `tile_config` over all of q's tokens, and max_seqlen_q is not read.
    """
    return _prefill_attention(
        q,
        k_cache,
        v_cache,
        cu_seqlens_q,
        seq_lens,
        block_tables,
        scale,
        max_seqlen_q,
        out,
        block_m=block_m,
        block_n=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
        tiles=tiles,
    )


def _prefill_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,  # [B+1] int32
    seq_lens: torch.Tensor,  # [B] int32, whole context (cached prefix + new tokens)
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    max_seqlen_q: int,
    out: torch.Tensor | None = None,  # [T, num_heads, head_dim]
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tiles: torch.Tensor | None = None,  # [max_tiles] int32, from build_tile_table
    select_lookup: bool = True,
) -> torch.Tensor:
    """`prefill_attention` with the variant only the benchmarks' sweep compares: the block-table
    lookup of a key tile wider than a cache block (`select_lookup`, see
    block_table.tile_row_offsets)."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert q.stride(2) == 1 and num_heads % num_kv_heads == 0
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    batch = seq_lens.shape[0]
    assert cu_seqlens_q.shape == (batch + 1,) and cu_seqlens_q.dtype == torch.int32
    assert seq_lens.dtype == torch.int32
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1
    if num_tokens == 0 or batch == 0 or (tiles is None and max_seqlen_q == 0):
        return out
    group = num_heads // num_kv_heads
    if tiles is not None:
        assert tiles.dtype == torch.int32 and tiles.dim() == 1, (tiles.dtype, tiles.shape)
        cfg = tile_config(block_size, group, num_kv_heads, num_tokens, q.device)
    else:
        num_tiles_at_128 = num_kv_heads * batch * triton.cdiv(max_seqlen_q * group, 128)
        cfg = _default_config(block_size, num_tiles_at_128, q.device)
    block_m = block_m or cfg[0]
    block_n = block_n or cfg[1]
    num_warps = num_warps or cfg[2]
    num_stages = num_stages or cfg[3]
    assert block_m >= group, f"block_m {block_m} must hold a whole GQA group of {group}"
    assert block_size % block_n == 0 or block_n % block_size == 0
    tokens_per_tile = block_m // group
    if tiles is not None:
        grid = (num_kv_heads, tiles.shape[0], 1)
    else:
        grid = (num_kv_heads, batch, triton.cdiv(max_seqlen_q, tokens_per_tile))
    _flash_prefill_kernel[grid](
        q_ptr=q,
        k_cache_ptr=k_cache,
        v_cache_ptr=v_cache,
        out_ptr=out,
        cu_seqlens_q_ptr=cu_seqlens_q,
        seq_lens_ptr=seq_lens,
        block_tables_ptr=block_tables,
        tiles_ptr=tiles if tiles is not None else seq_lens,
        qk_scale=scale * _LOG2E,
        stride_q_t=q.stride(0),
        stride_q_h=q.stride(1),
        stride_out_t=out.stride(0),
        stride_out_h=out.stride(1),
        stride_cache_block=k_cache.stride(0),
        stride_cache_tok=k_cache.stride(1),
        stride_cache_head=k_cache.stride(2),
        stride_bt_b=block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        TOKENS_PER_TILE=tokens_per_tile,
        SELECT_LOOKUP=select_lookup,
        TILED=tiles is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
