"""Split-K paged decode attention (flash-decoding) with GQA head packing, plus the LSE reduce.

One query token per sequence. Program (b, kv_head, split) loads each K/V tile of its context
partition once and scores it against all query heads of the GQA group at once: the group is packed
into the M dimension of `tl.dot`, padded to 16 rows. The grid is (kv_heads, batch, max_num_splits)
with max_num_splits fixed by the batch size and the block-table width, never by the data, so the
launch can be captured in a CUDA graph; how many splits a sequence uses is decided on the GPU from
its length, and programs without work exit at once. A second kernel merges the partial results with
their log-sum-exp. When max_num_splits is 1 (large batches already fill the GPU) the main kernel
normalizes and writes the output itself: no reduce launch, no partial buffers.

With `fused_reduce` (the "decode_fused_reduce" experiment) there is no second kernel either: each
split program, once its partial is stored, counts itself in on a per-(row, KV head) arrival counter,
and the program that arrives last merges every split of its group's heads and sets the counter back
to 0 for the next launch. The merge is the reduce kernel's code (`_merge_splits`, same chunking,
same order), so at the reduce's num_warps (4, the default) the output is the same bits.

`decode_attention_rope` (the "decode_fused_rope" experiment) also does the work of
`qk_norm_rope_store_kv` before it: q, k and v come raw from the qkv projection; every program
normalizes and rotates the query heads it packs (kernels/qk_norm_rope.py's `norm_rope_heads`, so
the same bits), and the program whose split ends the context computes the new token's k the same
way, stores it and v in the token's cache slot, and takes both from registers for that position.
No program reads the slot being written, so none waits for another. Meant for small decode
steps: at many rows session 5 measured such a kernel slower than the two launches.

With `row_order` (a permutation of the rows, longest context first) program b takes row
row_order[b]: the longest rows start first instead of forming the grid's tail. Each row's result
does not depend on the order.

The grid's first (fastest-varying) dimension is the KV head: the programs of one row's heads are
dispatched side by side and read the interleaved heads of the same cache blocks at about the same
time, which the memory serves faster than one head of many rows at a time
(`benchmarks/bench_decode_varlen.py` compares the two through `_decode_attention`'s `heads_first`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .block_table import tile_row_offsets
from .pdl import device_index, pdl_enabled, pdl_start
from .qk_norm_rope import _check_qk, norm_rope_heads, rope_rows

_LOG2E = 1.4426950408889634
# Upper bound of the default split count (a single sequence then has _SPLITS_CAP * num_kv_heads
# programs).
_SPLITS_CAP = 128
# Per device, the fused reduce's arrival counters ([rows * num_kv_heads] int32, zero between
# launches), every one ever allocated: a captured CUDA graph keeps the address it was captured with.
_ARRIVAL_COUNTERS: dict[tuple[str, int | None], list[torch.Tensor]] = {}


@triton.jit
def _num_splits_and_partition(
    seq_len, max_num_splits, MIN_PARTITION: tl.constexpr, BLOCK_N: tl.constexpr
):
    # Spread the context over at most max_num_splits splits of at least MIN_PARTITION tokens,
    # each a multiple of BLOCK_N; the reduce kernel recomputes the same numbers.
    num_splits = tl.minimum(tl.cdiv(seq_len, MIN_PARTITION), max_num_splits)
    num_splits = tl.maximum(num_splits, 1)
    partition = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N), 1) * BLOCK_N
    num_splits = tl.cdiv(seq_len, partition)  # 0 for an empty (padding) row
    return num_splits, partition


@triton.jit
def _merge_splits(
    out_ptr,  # [B, num_heads, head_dim]
    part_out_ptr,  # [B, num_heads, max_num_splits, head_dim] float32
    part_lse_ptr,  # [B, num_heads, max_num_splits] float32, log2 units
    out_off,  # int64: this head's output, b * stride_out_b + head * stride_out_h
    row,  # int64: this head's first partial, (b * num_heads + head) * max_num_splits
    num_splits,  # splits the row used; 0 (an empty row) writes zeros
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,  # splits merged per step: [SPLIT_CHUNK, BLOCK_D] in registers
    CACHE: tl.constexpr,  # cache modifier of the partials' loads
):
    """One head's output: its splits' partial outputs weighted by exp2(lse - max lse), in split
    order. Shared by the reduce kernel and the fused reduce, so both compute the same bits."""
    offs_s = tl.arange(0, SPLIT_CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    # Finite fills, so an empty row computes exp2(-huge) = 0 instead of inf - inf.
    lse_max = tl.full([SPLIT_CHUNK], -1e30, dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        s_mask = s0 + offs_s < num_splits
        lse = tl.load(
            part_lse_ptr + row + s0 + offs_s, mask=s_mask, other=-1e30, cache_modifier=CACHE
        )
        lse_max = tl.maximum(lse_max, lse)
    m = tl.max(lse_max, 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    total = tl.zeros([SPLIT_CHUNK], dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        s_mask = s0 + offs_s < num_splits
        lse = tl.load(
            part_lse_ptr + row + s0 + offs_s, mask=s_mask, other=-1e30, cache_modifier=CACHE
        )
        weights = tl.where(s_mask, tl.exp2(lse - m), 0.0)
        parts = tl.load(
            part_out_ptr + (row + s0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
            other=0.0,
            cache_modifier=CACHE,
        )  # [SPLIT_CHUNK, BLOCK_D]
        acc += tl.sum(parts * weights[:, None], 0)
        total += weights
    o = acc / tl.maximum(tl.sum(total, 0), 1e-30)  # zeros when there is no split (empty row)
    tl.store(out_ptr + out_off + offs_d, o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def _merge_group(
    out_ptr,  # [B, num_heads, head_dim]
    part_out_ptr,  # [B, num_heads, max_num_splits, head_dim] float32
    part_lse_ptr,  # [B, num_heads, max_num_splits] float32, log2 units
    b,
    kv_head,
    num_kv_heads,
    num_splits,
    max_num_splits,
    stride_out_b,
    stride_out_h,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):
    """The fused reduce: `_merge_splits` for each query head of KV head `kv_head`'s group, head
    by head as the reduce kernel's programs do. The partials were written by other programs of
    this launch, so they are read from L2 (.cg), never from a stale L1 line."""
    for g in tl.static_range(GROUP):
        head = kv_head * GROUP + g
        _merge_splits(
            out_ptr,
            part_out_ptr,
            part_lse_ptr,
            b.to(tl.int64) * stride_out_b + head * stride_out_h,
            (b * (GROUP * num_kv_heads) + head).to(tl.int64) * max_num_splits,
            num_splits,
            HEAD_DIM,
            BLOCK_D,
            SPLIT_CHUNK,
            ".cg",
        )


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
    out_ptr,  # [B, num_heads, head_dim]; written only if SINGLE_SPLIT or FUSED_REDUCE
    counters_ptr,  # [>= B * num_kv_heads] int32, zero between launches; used only if FUSED_REDUCE
    k_new_ptr,  # [B, num_kv_heads, head_dim] the new token's raw k; FUSED_ROPE only
    v_new_ptr,  # [B, num_kv_heads, head_dim] the new token's v; FUSED_ROPE only
    positions_ptr,  # [B] int32/int64, the new token's position; FUSED_ROPE only
    slot_mapping_ptr,  # [B] int32/int64 its cache slot, < 0: none; FUSED_ROPE only
    cos_ptr,  # [max_position, head_dim]; FUSED_ROPE only
    sin_ptr,  # [max_position, head_dim]; FUSED_ROPE only
    q_weight_ptr,  # [head_dim]; FUSED_ROPE and HAS_NORM only
    k_weight_ptr,  # [head_dim]; FUSED_ROPE and HAS_NORM only
    max_num_splits,  # runtime: a new batch size must not mean a new compile
    qk_scale,  # softmax scale * log2(e)
    q_eps,
    k_eps,
    stride_q_b,
    stride_q_h,
    stride_k_new_b,
    stride_k_new_h,
    stride_v_new_b,
    stride_v_new_h,
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
    FUSED_REDUCE: tl.constexpr,  # several splits: the last to arrive merges them, no reduce
    SPLIT_CHUNK: tl.constexpr,  # the fused reduce's step (as the reduce kernel's); else 1
    ROW_ORDER: tl.constexpr,  # program b takes row row_order[b]
    HEADS_FIRST: tl.constexpr,  # grid (kv_heads, batch, splits) instead of (batch, kv_heads, ..)
    FUSED_ROPE: tl.constexpr,  # q is raw: norm + rotary here, the new token's K/V stored here
    HAS_NORM: tl.constexpr,  # FUSED_ROPE with Qwen3's q/k RMSNorm
    HALF: tl.constexpr,  # HEAD_DIM // 2 (FUSED_ROPE: BLOCK_D == HEAD_DIM)
    PDL: tl.constexpr,  # launched as a programmatic dependent (kernels/pdl.py)
):
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
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    if SINGLE_SPLIT:
        # The whole context; a seq_len == 0 padding row runs no tile and writes zeros below.
        start = 0
        end = seq_len
    else:
        num_splits, partition = _num_splits_and_partition(
            seq_len, max_num_splits, MIN_PARTITION, BLOCK_N
        )
        if split >= num_splits:  # also every split of a seq_len == 0 padding row
            if FUSED_REDUCE and split == 0:  # no split will arrive: write the empty row's zeros
                _merge_group(
                    out_ptr,
                    part_out_ptr,
                    part_lse_ptr,
                    b,
                    kv_head,
                    num_kv_heads,
                    num_splits,
                    max_num_splits,
                    stride_out_b,
                    stride_out_h,
                    GROUP,
                    HEAD_DIM,
                    BLOCK_D,
                    SPLIT_CHUNK,
                )
            return
        start = split * partition
        end = tl.minimum(start + partition, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    if FUSED_ROPE:
        cos1, cos2, sin1, sin2 = rope_rows(
            cos_ptr, sin_ptr, tl.load(positions_ptr + b).to(tl.int64), HEAD_DIM, HALF, BLOCK_D // 2
        )
        # rope(q_norm(q)) of the group's heads, the bits qk_norm_rope would have stored.
        q1, q2 = norm_rope_heads(
            q_ptr + (kv_head * GROUP) * stride_q_h,
            q_weight_ptr,
            cos1,
            cos2,
            sin1,
            sin2,
            b.to(tl.int64),
            stride_q_b,
            stride_q_h,
            GROUP,
            q_eps,
            HAS_NORM,
            HEAD_DIM,
            HALF,
            GROUP_PAD,
            BLOCK_D // 2,
        )
        q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (GROUP_PAD, BLOCK_D))
        # The new token (position seq_len - 1) lies in the split that ends the context: its
        # program alone computes rope(k_norm(k)) as qk_norm_rope does, stores it and v in the
        # token's cache slot (a padding row's slot -1: nowhere) and attends to both from
        # registers. No program of this launch reads that slot, so none waits for the store.
        if end == seq_len:
            k1, k2 = norm_rope_heads(
                k_new_ptr + kv_head * stride_k_new_h,
                k_weight_ptr,
                cos1,
                cos2,
                sin1,
                sin2,
                b.to(tl.int64),
                stride_k_new_b,
                stride_k_new_h,
                1,
                k_eps,
                HAS_NORM,
                HEAD_DIM,
                HALF,
                1,
                BLOCK_D // 2,
            )
            k_new = tl.reshape(tl.permute(tl.join(k1, k2), (0, 2, 1)), (1, BLOCK_D))
            v_new = tl.load(
                v_new_ptr + b.to(tl.int64) * stride_v_new_b + kv_head * stride_v_new_h + offs_d,
                mask=d_mask,
                other=0.0,
            )[None, :]  # [1, BLOCK_D]
            slot = tl.load(slot_mapping_ptr + b).to(tl.int64)
            dst = (
                (slot // BLOCK_SIZE) * stride_cache_block
                + (slot % BLOCK_SIZE) * stride_cache_tok
                + kv_head.to(tl.int64) * stride_cache_head
                + offs_d[None, :]
            )
            new_mask = (tl.arange(0, 1)[:, None] < tl.where(slot >= 0, 1, 0)) & d_mask[None, :]
            tl.store(k_cache_ptr + dst, k_new, mask=new_mask)
            tl.store(v_cache_ptr + dst, v_new, mask=new_mask)
        else:  # the token is not in this split: never selected below
            k_new = tl.zeros([1, BLOCK_D], dtype=k_new_ptr.dtype.element_ty)
            v_new = tl.zeros([1, BLOCK_D], dtype=v_new_ptr.dtype.element_ty)
    else:
        q = tl.load(
            q_ptr + b.to(tl.int64) * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :],
            mask=g_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [GROUP_PAD, BLOCK_D]

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt_b
    head_off = kv_head.to(tl.int64) * stride_cache_head
    for tile_start in range(start, end, BLOCK_N):
        n_mask = tile_start + offs_n < end
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
        if FUSED_ROPE:
            # The new token from registers; its slot is being written in this launch.
            is_new = (n_mask & (tile_start + offs_n == seq_len - 1))[:, None]
            in_cache = n_mask & (tile_start + offs_n != seq_len - 1)
            kv_mask = in_cache[:, None] & d_mask[None, :]
            k = tl.where(is_new, k_new, tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0))
            v = tl.where(is_new, v_new, tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0))
        else:
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if SINGLE_SPLIT:
        # l_i > 0 for a real row; an empty row has acc == 0 and l_i == 0, so it writes zeros.
        out_off = b.to(tl.int64) * stride_out_b + heads[:, None] * stride_out_h + offs_d[None, :]
        tl.store(
            out_ptr + out_off,
            (acc / tl.maximum(l_i, 1e-30)[:, None]).to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & d_mask[None, :],
        )
    else:
        # Every split holds >= 1 key, so l_i > 0 for the real rows.
        part_row = (b * (GROUP * num_kv_heads) + heads).to(tl.int64) * max_num_splits + split
        tl.store(part_lse_ptr + part_row, m_i + tl.log2(l_i), mask=g_mask)
        tl.store(
            part_out_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :],
            acc / l_i[:, None],
            mask=g_mask[:, None] & d_mask[None, :],
        )
        if FUSED_REDUCE:
            # Every thread's partial stores come before the arrival (the barrier), and the arrival
            # is acq_rel at GPU scope: the program that counts num_splits - 1 sees every split's
            # partials. It alone touches the counter after that, so it resets it for the next
            # launch (or CUDA-graph replay) without a memset.
            tl.debug_barrier()
            counter = counters_ptr + b * num_kv_heads + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                tl.store(counter, 0)
                _merge_group(
                    out_ptr,
                    part_out_ptr,
                    part_lse_ptr,
                    b,
                    kv_head,
                    num_kv_heads,
                    num_splits,
                    max_num_splits,
                    stride_out_b,
                    stride_out_h,
                    GROUP,
                    HEAD_DIM,
                    BLOCK_D,
                    SPLIT_CHUNK,
                )


@triton.jit
def _paged_decode_reduce_kernel(
    out_ptr,  # [B, num_heads, head_dim]
    part_out_ptr,  # [B, num_heads, max_num_splits, head_dim] float32
    part_lse_ptr,  # [B, num_heads, max_num_splits] float32, log2 units
    seq_lens_ptr,  # [B] int32
    max_num_splits,
    stride_out_b,
    stride_out_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,  # splits merged per step: [SPLIT_CHUNK, BLOCK_D] in registers
    MIN_PARTITION: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    num_splits, _ = _num_splits_and_partition(seq_len, max_num_splits, MIN_PARTITION, BLOCK_N)
    _merge_splits(
        out_ptr,
        part_out_ptr,
        part_lse_ptr,
        b.to(tl.int64) * stride_out_b + head * stride_out_h,
        (b * tl.num_programs(1) + head).to(tl.int64) * max_num_splits,
        num_splits,
        HEAD_DIM,
        BLOCK_D,
        SPLIT_CHUNK,
        "",
    )


def _default_split(
    batch: int, num_kv_heads: int, max_context: int, device: torch.device
) -> tuple[int, int]:
    """(max_num_splits, min_partition) for a launch of `batch` rows: fixed by the batch size and
    the block-table width (`max_context`), never by the data.

    Each rule was the fastest in bench_decode_varlen.py's sweep (rows of mixed lengths taken
    longest first; the figures are in benchmarks/README.md):
    - one split once the (row, KV head) programs alone give every SM five: more splits only add
      a reduce;
    - from three per SM, at most two splits of >= 512 tokens;
    - below that, enough splits of >= 256 tokens for ~32 programs per SM (the short splits keep
      the long rows from forming the grid's tail).
    """
    if device.type == "cuda":
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        num_sms = 4
    pairs = batch * num_kv_heads
    if pairs >= 5 * num_sms:
        return 1, 256
    if pairs >= 3 * num_sms:
        return max(1, min(2, triton.cdiv(max_context, 512))), 512
    wanted = triton.cdiv(32 * num_sms, pairs)
    return max(1, min(wanted, _SPLITS_CAP, triton.cdiv(max_context, 256))), 256


def _arrival_counters(like: torch.Tensor, size: int) -> torch.Tensor:
    """The fused reduce's arrival counters on `like`'s device: at least `size` int32 zeros, kept
    between launches (every launch leaves them at zero). A larger grid gets a new, larger buffer;
    the old ones stay allocated, since a captured CUDA graph may still read one. The first launch
    of the largest grid must run outside a capture (as the warm-up before one does): a buffer
    zeroed inside a capture would hold garbage until the graph first replayed."""
    key = (like.device.type, device_index(like) if like.is_cuda else like.device.index)
    buffers = _ARRIVAL_COUNTERS.setdefault(key, [])
    if not buffers or buffers[-1].numel() < size:
        if like.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"decode_attention(fused_reduce=True): {size} arrival counters needed during a "
                "CUDA-graph capture; launch the same grid once before capturing"
            )
        numel = max(size, 2 * buffers[-1].numel() if buffers else 1024)
        buffers.append(torch.zeros(numel, dtype=torch.int32, device=like.device))
    return buffers[-1]


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
    fused_reduce: bool = False,
) -> torch.Tensor:
    """Attention of one query per sequence (position seq_lens[b] - 1) over its paged context.

    The keyword-only arguments tune the split: `max_num_splits` and `min_partition` (fewest tokens
    per split; both default from the batch size and the block-table width, so a fixed-shape call
    has a fixed grid), the key tile `block_n` and the launch's `num_warps` / `num_stages` (default
    2 with one split, 3 with several); `row_order` (longest context first) is the order the
    programs take the rows in. With several splits, `fused_reduce` has the last split of each
    (row, KV head) merge them instead of a second kernel (the "decode_fused_reduce" experiment;
    same output). Its arrival counters are one buffer per device, so fused launches on one device
    must not overlap: keep them on one stream.
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
        fused_reduce=fused_reduce,
    )


def decode_attention_rope(
    q: torch.Tensor,  # [B, num_heads, head_dim] raw: before the q norm and rotary
    k: torch.Tensor,  # [B, num_kv_heads, head_dim] raw: the new token's k
    v: torch.Tensor,  # [B, num_kv_heads, head_dim] the new token's v
    positions: torch.Tensor,  # [B] int32/int64, seq_lens - 1 for a real row
    cos_cache: torch.Tensor,  # [max_position, head_dim]
    sin_cache: torch.Tensor,  # [max_position, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [B] int32/int64, slots < 0 skipped
    seq_lens: torch.Tensor,  # [B] int32, counting the new token; 0 marks a padding row
    block_tables: torch.Tensor,  # [B, max_blocks] int32, padded with -1
    scale: float,
    q_weight: torch.Tensor | None = None,  # [head_dim]
    k_weight: torch.Tensor | None = None,  # [head_dim]
    q_eps: float = 1e-6,
    k_eps: float = 1e-6,
    out: torch.Tensor | None = None,  # [B, num_heads, head_dim]
    **kwargs,
) -> torch.Tensor:
    """`qk_norm_rope_store_kv` followed by `decode_attention`, in one launch (the
    "decode_fused_rope" experiment): every program normalizes and rotates the query heads it
    packs itself (kernels/qk_norm_rope.py's code, so q has the same bits), the program whose split
    ends the context stores rope(k_norm(k)) and v in slot `slot_mapping[b]` (the same bits as the
    rotary kernel's store), and uses them from registers for that position instead of reading the
    cache: no program waits for another. q, k and v may be views into the packed qkv projection;
    head_dim must be a power of two. The keyword arguments are `decode_attention`'s.
    """
    _check_qk(q, k, positions, cos_cache, sin_cache, q_weight, k_weight, None)
    assert v.shape == k.shape and v.dtype == k.dtype and v.stride(2) == 1, (v.shape, k.shape)
    assert k_cache.dtype == q.dtype, (k_cache.dtype, q.dtype)
    assert slot_mapping.shape == (q.shape[0],), (slot_mapping.shape, q.shape)
    assert slot_mapping.dtype in (torch.int32, torch.int64), slot_mapping.dtype
    head_dim = q.shape[2]
    assert head_dim == triton.next_power_of_2(head_dim), head_dim
    rope = _Rope(k, v, positions, cos_cache, sin_cache, slot_mapping, q_weight, k_weight)
    return _decode_attention(
        q,
        k_cache,
        v_cache,
        seq_lens,
        block_tables,
        scale,
        out,
        rope=rope,
        q_eps=q_eps,
        k_eps=k_eps,
        **kwargs,
    )


class _Rope(NamedTuple):
    """decode_attention_rope's tensors, handed to the launch."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_cache: torch.Tensor
    sin_cache: torch.Tensor
    slot_mapping: torch.Tensor
    q_weight: torch.Tensor | None
    k_weight: torch.Tensor | None


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
    fused_reduce: bool = False,
    select_lookup: bool = True,
    heads_first: bool = True,
    rope: _Rope | None = None,
    q_eps: float = 0.0,
    k_eps: float = 0.0,
) -> torch.Tensor:
    """`decode_attention` with the variants only the benchmarks' sweeps compare: the block-table
    lookup of a key tile wider than a cache block (`select_lookup`, see
    block_table.tile_row_offsets) and the grid order (`heads_first=False`: the rows in the
    grid's fastest dimension instead of the KV heads)."""
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
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(2) == 1
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * block_size
    if max_num_splits is None:
        max_num_splits, default_partition = _default_split(
            batch, num_kv_heads, max_context, q.device
        )
        if min_partition is None:
            min_partition = default_partition
        else:  # never more than min_partition-sized pieces
            max_num_splits = max(1, min(max_num_splits, triton.cdiv(max_context, min_partition)))
    elif min_partition is None:
        min_partition = 256
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
    split_chunk = min(64, triton.next_power_of_2(max_num_splits))
    fused = fused_reduce and not single_split
    # Only read by the fused reduce; otherwise any int32 tensor stands in.
    counters = _arrival_counters(q, batch * num_kv_heads) if fused else seq_lens
    grid = (num_kv_heads, batch) if heads_first else (batch, num_kv_heads)
    has_norm = rope is not None and rope.q_weight is not None
    pdl = pdl_enabled(q)
    _paged_decode_kernel[(*grid, max_num_splits)](
        q_ptr=q,
        k_cache_ptr=k_cache,
        v_cache_ptr=v_cache,
        seq_lens_ptr=seq_lens,
        block_tables_ptr=block_tables,
        row_order_ptr=row_order if row_order is not None else seq_lens,
        part_out_ptr=part_out,
        part_lse_ptr=part_lse,
        out_ptr=out,
        counters_ptr=counters,
        # Without rope, any tensor stands in for its pointers: they are never read.
        k_new_ptr=rope.k if rope else q,
        v_new_ptr=rope.v if rope else q,
        positions_ptr=rope.positions if rope else seq_lens,
        slot_mapping_ptr=rope.slot_mapping if rope else seq_lens,
        cos_ptr=rope.cos_cache if rope else q,
        sin_ptr=rope.sin_cache if rope else q,
        q_weight_ptr=rope.q_weight if has_norm else q,
        k_weight_ptr=rope.k_weight if has_norm else q,
        max_num_splits=max_num_splits,
        qk_scale=scale * _LOG2E,
        q_eps=q_eps,
        k_eps=k_eps,
        stride_q_b=q.stride(0),
        stride_q_h=q.stride(1),
        stride_k_new_b=rope.k.stride(0) if rope else 0,
        stride_k_new_h=rope.k.stride(1) if rope else 0,
        stride_v_new_b=rope.v.stride(0) if rope else 0,
        stride_v_new_h=rope.v.stride(1) if rope else 0,
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
        FUSED_REDUCE=fused,
        # The reduce kernel's step, so the merge sums in the same order; a constant without the
        # fused reduce, where it is unused (no compile per split count).
        SPLIT_CHUNK=split_chunk if fused else 1,
        ROW_ORDER=row_order is not None,
        HEADS_FIRST=heads_first,
        FUSED_ROPE=rope is not None,
        HAS_NORM=has_norm,
        HALF=head_dim // 2,
        PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=pdl,
    )
    if single_split or fused:
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
        SPLIT_CHUNK=split_chunk,
        MIN_PARTITION=min_partition,
        PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )
    return out
