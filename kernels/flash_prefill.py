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

The "tma" variant (`_prefill_attention(..., variant="tma")`, the engine's "prefill_tma"
experiment) is the same kernel with its tiles loaded by the tensor-memory accelerator through host
tensor descriptors: the query tile as one box, each key/value tile as one box of cache rows when
the tile lies in one cache block. Its knobs: one program per query head instead of per GQA group
(`pack_gqa`), and warp specialization (`warp_specialize`: one key loop, masked throughout, split
by Triton into a TMA producer warp group and two consumer warp groups). It stays opt-in until a
device run measures it against the pointer loads.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .block_table import tile_row_offsets
from .pdl import sm90_or_newer

_LOG2E = 1.4426950408889634


@triton.jit
def _load_q(
    q_ptr,  # [T, num_heads, head_dim]
    q_desc,  # TensorDescriptor: q [T, num_heads, d] box [TOKENS_PER_TILE, GROUP, d]; GROUP 1:
    # q as [T, num_heads * d] rows, box [BLOCK_M, d]
    q_start,
    m0,
    head0,  # first query head of the tile's rows
    tok,  # [BLOCK_M] token of each row within the sequence's new tokens
    head,  # [BLOCK_M] query head of each row
    row_mask,  # [BLOCK_M]
    stride_q_t,
    stride_q_h,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    Q_TMA: tl.constexpr,
):  # -> [BLOCK_M, HEAD_DIM]
    if Q_TMA:
        # Rows past the sequence read the next one's tokens, or a padded step's tokens that
        # belong to no row (anything, NaN included; zeros past T). Their outputs are never
        # stored, but a NaN score row would still reach the row max: zero them, as the pointer
        # load does.
        if GROUP == 1:
            q = q_desc.load([q_start + m0, head0 * HEAD_DIM])
        else:
            # The group's heads are adjacent in q: the packed rows are one [tokens, GROUP, d] box.
            q = tl.reshape(q_desc.load([q_start + m0, head0, 0]), [BLOCK_M, HEAD_DIM])
        return tl.where(row_mask[:, None], q, 0.0)
    else:
        offs_d = tl.arange(0, HEAD_DIM)
        q_rows = (q_start + tok).to(tl.int64)
        return tl.load(
            q_ptr + q_rows[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
            mask=row_mask[:, None],
            other=0.0,
        )


@triton.jit
def _load_kv(
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    k_desc,  # TensorDescriptor: k_cache as [num_blocks * block_size, kv_heads * d] rows
    v_desc,  # the same over v_cache; boxes of [BLOCK_N, d]
    bt_row,  # this sequence's block-table row
    tile_start,  # first key position of the tile (a multiple of BLOCK_N)
    seq_len,
    kv_head,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # the tile may reach past seq_len: values there read as zeros
    SELECT_LOOKUP: tl.constexpr,
    KV_TMA: tl.constexpr,  # through k_desc / v_desc (BLOCK_N divides BLOCK_SIZE)
):  # -> k, v: [BLOCK_N, HEAD_DIM] each
    if KV_TMA:
        # The tile lies in one cache block: one box of BLOCK_N cache rows at the head's columns.
        block = tl.load(bt_row + tile_start // BLOCK_SIZE)
        row = block * BLOCK_SIZE + tile_start % BLOCK_SIZE
        k = k_desc.load([row, kv_head * HEAD_DIM])
        v = v_desc.load([row, kv_head * HEAD_DIM])
        if MASKED:
            # Slots past seq_len hold whatever the cache held (NaN included): the scores mask
            # drops their keys, but p = 0 times a NaN value is still NaN.
            n_mask = tile_start + tl.arange(0, BLOCK_N) < seq_len
            v = tl.where(n_mask[:, None], v, 0.0)
    else:
        rows = tile_row_offsets(
            bt_row,
            tile_start,
            seq_len,
            stride_cache_block,
            stride_cache_tok,
            BLOCK_SIZE,
            BLOCK_N,
            MASKED,
            SELECT_LOOKUP,
        )
        offs_d = tl.arange(0, HEAD_DIM)
        kv_off = kv_head.to(tl.int64) * stride_cache_head + rows[:, None] + offs_d[None, :]
        if MASKED:
            n_mask = tile_start + tl.arange(0, BLOCK_N) < seq_len
            k = tl.load(k_cache_ptr + kv_off, mask=n_mask[:, None], other=0.0)
            v = tl.load(v_cache_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        else:
            k = tl.load(k_cache_ptr + kv_off)
            v = tl.load(v_cache_ptr + kv_off)
    return k, v


@triton.jit
def _online_softmax_step(
    q,  # [BLOCK_M, HEAD_DIM]
    k,  # [BLOCK_N, HEAD_DIM]
    v,  # [BLOCK_N, HEAD_DIM]
    acc,  # [BLOCK_M, HEAD_DIM] float32
    m_i,  # [BLOCK_M] running max of the scaled scores (base 2)
    l_i,  # [BLOCK_M] running sum
    qk_scale,
    visible,  # [BLOCK_M, BLOCK_N] which keys each row sees; MASKED only
    MASKED: tl.constexpr,
):  # -> acc, m_i, l_i after the key tile
    if MASKED:
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(visible, qk, float("-inf"))
        # Every row sees key full_end <= its position in the first diagonal tile, so m_new is
        # finite from there on.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
    else:
        qk = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


# A step's prefill rows follow its decode rows, so seq_lens often starts at an unaligned offset:
# not specializing on its alignment keeps that from compiling a second variant mid-run (tiles_ptr
# is seq_lens when there is no tile table).
@triton.jit(do_not_specialize_on_alignment=["seq_lens_ptr", "tiles_ptr"])
def _flash_prefill_kernel(
    q_ptr,  # [T, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    out_ptr,  # [T, num_heads, head_dim]
    q_desc,  # TensorDescriptor over q (see _load_q), or None without Q_TMA
    k_desc,  # TensorDescriptor over k_cache (see _load_kv), or None without KV_TMA
    v_desc,  # TensorDescriptor over v_cache, or None without KV_TMA
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
    GROUP: tl.constexpr,  # query heads packed into the M dimension: KV_GROUP, or 1 (unpacked)
    KV_GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # KV cache block size
    BLOCK_M: tl.constexpr,  # rows = tokens * GROUP (+ unused rows when GROUP doesn't divide it)
    BLOCK_N: tl.constexpr,
    TOKENS_PER_TILE: tl.constexpr,  # BLOCK_M // GROUP
    SELECT_LOOKUP: tl.constexpr,  # see block_table.tile_row_offsets (BLOCK_N > BLOCK_SIZE only)
    TILED: tl.constexpr,  # the (row, query tile) of a program comes from tiles_ptr
    Q_TMA: tl.constexpr,  # the query tile through q_desc
    KV_TMA: tl.constexpr,  # key and value tiles through k_desc / v_desc
    WARP_SPECIALIZE: tl.constexpr,  # one key loop, warp-specialized (KV_TMA only)
):
    # Programs along dim 0: KV heads (packed GQA), or query heads (GROUP 1).
    if GROUP == KV_GROUP:
        kv_head = tl.program_id(0)
    else:
        kv_head = tl.program_id(0) // KV_GROUP
    # Warp specialization takes no early exit: a program without work runs an empty key loop
    # and stores nothing (has_work).
    has_work = True
    if TILED:
        tl.static_assert(not WARP_SPECIALIZE, "a tile table counts packed GQA rows")
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
    if WARP_SPECIALIZE:
        has_work = has_work & (m0 < q_len)
    elif m0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len  # cached prefix before the new tokens

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = m0 + offs_m // GROUP  # [BLOCK_M] token index within the sequence's new tokens
    head = tl.program_id(0) * GROUP + offs_m % GROUP
    row_mask = (offs_m < TOKENS_PER_TILE * GROUP) & (tok < q_len) & has_work
    q = _load_q(
        q_ptr,
        q_desc,
        q_start,
        m0,
        tl.program_id(0) * GROUP,
        tok,
        head,
        row_mask,
        stride_q_t,
        stride_q_h,
        GROUP,
        HEAD_DIM,
        BLOCK_M,
        Q_TMA,
    )  # [BLOCK_M, HEAD_DIM]
    q_pos = ctx_len + tok  # [BLOCK_M] position in the context

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt_b

    diag_end = tl.minimum(ctx_len + m0 + TOKENS_PER_TILE, seq_len)
    if WARP_SPECIALIZE:
        # One key loop, masked throughout: the loop Triton's Hopper warp specialization takes (a
        # second loop after it, or a branch inside it, makes the pass fail). The value rows past
        # seq_len are not zeroed here: the cache's unused slots must hold finite values.
        for tile_start in tl.range(
            0, tl.where(has_work, diag_end, 0), BLOCK_N, warp_specialize=True
        ):
            k, v = _load_kv(
                k_cache_ptr,
                v_cache_ptr,
                k_desc,
                v_desc,
                bt_row,
                tile_start,
                seq_len,
                kv_head,
                stride_cache_block,
                stride_cache_tok,
                stride_cache_head,
                HEAD_DIM,
                BLOCK_SIZE,
                BLOCK_N,
                False,
                SELECT_LOOKUP,
                KV_TMA,
            )
            key_pos = tile_start + offs_n
            visible = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] < seq_len)
            acc, m_i, l_i = _online_softmax_step(q, k, v, acc, m_i, l_i, qk_scale, visible, True)
        l_i = tl.where(has_work, l_i, 1.0)  # a program without work stores nothing: no 0 / 0
    else:
        # Keys below the tile's first position are visible to every row: no masks.
        full_end = ((ctx_len + m0) // BLOCK_N) * BLOCK_N
        for tile_start in range(0, full_end, BLOCK_N):
            k, v = _load_kv(
                k_cache_ptr,
                v_cache_ptr,
                k_desc,
                v_desc,
                bt_row,
                tile_start,
                seq_len,
                kv_head,
                stride_cache_block,
                stride_cache_tok,
                stride_cache_head,
                HEAD_DIM,
                BLOCK_SIZE,
                BLOCK_N,
                False,
                SELECT_LOOKUP,
                KV_TMA,
            )
            acc, m_i, l_i = _online_softmax_step(q, k, v, acc, m_i, l_i, qk_scale, None, False)

        # The causal diagonal: keys up to the tile's last position (or the context's end).
        for tile_start in range(full_end, diag_end, BLOCK_N):
            k, v = _load_kv(
                k_cache_ptr,
                v_cache_ptr,
                k_desc,
                v_desc,
                bt_row,
                tile_start,
                seq_len,
                kv_head,
                stride_cache_block,
                stride_cache_tok,
                stride_cache_head,
                HEAD_DIM,
                BLOCK_SIZE,
                BLOCK_N,
                True,
                SELECT_LOOKUP,
                KV_TMA,
            )
            key_pos = tile_start + offs_n
            visible = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] < seq_len)
            acc, m_i, l_i = _online_softmax_step(q, k, v, acc, m_i, l_i, qk_scale, visible, True)

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


# "default": pointer loads; "tma": tensor descriptors where `tma_loads` allows (an experiment).
VARIANTS = ("default", "tma")


def tma_loads(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    group: int,  # query heads packed into a tile's rows (1: unpacked)
    block_n: int,
) -> tuple[bool, bool]:
    """Which tiles the "tma" variant loads through tensor descriptors: (query, key/value).

    Both need a Hopper or newer GPU (or the interpreter), 16-byte-aligned bases and strides. The
    query tile is one [tokens, group, d] box when the packed group is a power of two (a box's
    sides are); unpacked, one [block_m, d] box of q seen as [T, num_heads * d] rows (its heads
    adjacent). A key/value tile is one [block_n, d] box of the cache seen as
    [num_blocks * block_size, kv_heads * d] rows: block_n must divide the cache block (so the tile
    lies in one block), the cache must be contiguous and its rows must fit the box's int32
    coordinates.
    """
    if q.is_cuda and not sm90_or_newer(q):
        return False, False
    num_blocks, block_size, _, head_dim = k_cache.shape
    elem = q.element_size()
    q_tma = (
        group & (group - 1) == 0
        and (group > 1 or q.stride(1) == head_dim)
        and q.data_ptr() % 16 == 0
        and (q.stride(0) * elem) % 16 == 0
        and (q.stride(1) * elem) % 16 == 0
    )
    kv_tma = (
        block_size % block_n == 0
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and k_cache.data_ptr() % 16 == 0
        and v_cache.data_ptr() % 16 == 0
        and (head_dim * elem) % 16 == 0
        and num_blocks * block_size < 2**31
    )
    return q_tma, kv_tma


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
    variant: str = "default",
    warp_specialize: bool = False,
    pack_gqa: bool | None = None,
) -> torch.Tensor:
    """`prefill_attention` with the variants only the benchmarks' sweeps and the experiments
    select: the block-table lookup of a key tile wider than a cache block (`select_lookup`, see
    block_table.tile_row_offsets), and `variant="tma"`, which loads the query and key/value tiles
    with the tensor-memory accelerator where `tma_loads` allows (pointer loads elsewhere), with
    `block_n` cut to the cache block by default. `pack_gqa=False` (either variant) gives each
    query head its own programs instead of packing its GQA group into a tile's rows.

    `warp_specialize` (tma variant, key/value tiles through TMA) runs the keys in one loop,
    masked throughout, that Triton splits into a producer warp group (the TMA loads) and consumer
    warp groups (the MMAs and the softmax). Triton 3.6 specializes it on Hopper with num_warps=4
    (one producer and two consumers of half the rows each, 12 warps in all) and ignores the
    request at 8 warps (its default num_warps is 4). Its value rows past seq_len are not zeroed: unused cache slots must hold
    finite values (the engine's pool starts zeroed and holds only written K/V). Its query tile
    must be a plain [block_m, d] box, so it does not pack a GQA group into the tile's rows: one
    program per query head reads its KV head's tiles (`pack_gqa=False`, its default there; not
    with a tile table, whose tiles are counted in packed rows).
    """
    assert variant in VARIANTS, f"unknown variant {variant!r}; use one of {VARIANTS}"
    assert variant == "tma" or not warp_specialize, "warp_specialize is a knob of the tma variant"
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
    if block_n is None and variant == "tma":
        block_n = min(cfg[1], max(block_size, 16))  # a tile in one block, where dot allows
    block_n = block_n or cfg[1]
    num_warps = num_warps or (4 if warp_specialize else cfg[2])  # see below: 4 to specialize
    num_stages = num_stages or cfg[3]
    if pack_gqa is None:
        pack_gqa = not warp_specialize
    assert pack_gqa or tiles is None, "a tile table counts tiles of packed GQA rows"
    rows_group = group if pack_gqa else 1  # query heads in a tile's rows
    assert block_m >= rows_group, f"block_m {block_m} must hold a whole GQA group of {group}"
    assert block_size % block_n == 0 or block_n % block_size == 0
    tokens_per_tile = block_m // rows_group
    q_tma, kv_tma = (
        tma_loads(q, k_cache, v_cache, rows_group, block_n) if variant == "tma" else (False, False)
    )
    q_desc = k_desc = v_desc = None
    if q_tma and rows_group == 1:
        q_desc = TensorDescriptor(
            q, [num_tokens, num_heads * head_dim], [q.stride(0), 1], [block_m, head_dim]
        )
    elif q_tma:
        q_desc = TensorDescriptor(
            q, list(q.shape), list(q.stride()), [tokens_per_tile, group, head_dim]
        )
    if kv_tma:
        rows = [k_cache.shape[0] * block_size, num_kv_heads * head_dim]
        k_desc, v_desc = (
            TensorDescriptor(c, rows, [c.stride(1), 1], [block_n, head_dim])
            for c in (k_cache, v_cache)
        )
    if warp_specialize and not (kv_tma and q_tma and rows_group == 1):
        raise ValueError(
            "warp_specialize needs every tile through TMA and an unpacked query tile: "
            f"pack_gqa {pack_gqa}, block_n {block_n} dividing the cache block ({block_size}) "
            "of a contiguous cache, query heads adjacent in q"
        )
    num_programs_0 = num_kv_heads if pack_gqa else num_heads
    if tiles is not None:
        grid = (num_programs_0, tiles.shape[0], 1)
    else:
        grid = (num_programs_0, batch, triton.cdiv(max_seqlen_q, tokens_per_tile))
    _flash_prefill_kernel[grid](
        q_ptr=q,
        k_cache_ptr=k_cache,
        v_cache_ptr=v_cache,
        out_ptr=out,
        q_desc=q_desc,
        k_desc=k_desc,
        v_desc=v_desc,
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
        GROUP=rows_group,
        KV_GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        TOKENS_PER_TILE=tokens_per_tile,
        SELECT_LOOKUP=select_lookup,
        TILED=tiles is not None,
        Q_TMA=q_tma,
        KV_TMA=kv_tma,
        WARP_SPECIALIZE=warp_specialize,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
