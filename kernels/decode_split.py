"""How a decode row's keys are split over programs (flash-decoding), and the reduce that merges
the splits' partial results back with their log-sum-exp; kernels/paged_decode.py's kernel and
launch use both.

`_default_split` picks a launch's split from the batch size and the block-table width (never
from the data, so a CUDA graph's grid stays fixed); the kernels then decide each row's number
of splits on the GPU from its length (`_num_splits_and_partition`), the decode kernel and the
reduce alike.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .pdl import pdl_start

# Upper bound of the default split count (a single sequence then has _SPLITS_CAP * num_kv_heads
# programs).
_SPLITS_CAP = 128
# With 64-token splits (few rows, see _default_split): split programs per SM the grid holds. A
# row with more splits than the grid has split programs runs several in each.
_GRID_PROGRAMS_PER_SM = 4


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
    offs_s = tl.arange(0, SPLIT_CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    row = (b * tl.num_programs(1) + head).to(tl.int64) * max_num_splits
    # Finite fills, so an empty row computes exp2(-huge) = 0 instead of inf - inf.
    lse_max = tl.full([SPLIT_CHUNK], -1e30, dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        s_mask = s0 + offs_s < num_splits
        lse = tl.load(part_lse_ptr + row + s0 + offs_s, mask=s_mask, other=-1e30)
        lse_max = tl.maximum(lse_max, lse)
    m = tl.max(lse_max, 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    total = tl.zeros([SPLIT_CHUNK], dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        s_mask = s0 + offs_s < num_splits
        lse = tl.load(part_lse_ptr + row + s0 + offs_s, mask=s_mask, other=-1e30)
        weights = tl.where(s_mask, tl.exp2(lse - m), 0.0)
        parts = tl.load(
            part_out_ptr + (row + s0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
            other=0.0,
        )  # [SPLIT_CHUNK, BLOCK_D]
        acc += tl.sum(parts * weights[:, None], 0)
        total += weights
    o = acc / tl.maximum(tl.sum(total, 0), 1e-30)  # zeros when there is no split (empty row)
    tl.store(
        out_ptr + b.to(tl.int64) * stride_out_b + head * stride_out_h + offs_d,
        o.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


class _Split(NamedTuple):
    max_num_splits: int  # splits of the longest row the launch allows (the partial buffers)
    min_partition: int  # fewest tokens per split
    grid_splits: int  # split programs per (row, KV head) in the grid; each runs every n-th split


def _default_split(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> _Split:
    """The split of a launch of `batch` rows: fixed by the batch size and the block-table width
    (`max_context`), never by the data.

    Each rule was the fastest in bench_decode_varlen.py's sweep (rows of mixed lengths taken
    longest first) or in bench_latency.py (few rows); the figures are in benchmarks/README.md:
    - one split once the (row, KV head) programs alone give every SM five: more splits only add
      a reduce;
    - from three per SM, at most two splits of >= 512 tokens;
    - below that, enough splits of >= 256 tokens for ~32 programs per SM (the short splits keep
      the long rows from forming the grid's tail);
    - up to one (row, KV head) pair per two SMs (one to eight requests of Qwen3's 8 KV heads),
      splits down to one 64-token key tile, so that one request's 500-token context still
      reaches most SMs; the grid then holds about _GRID_PROGRAMS_PER_SM split programs per SM,
      not one per split the block table could need (a server's 32k-token tables would launch
      thousands of programs that exit at once), and a long row's programs run several splits.
    """
    if device.type == "cuda":
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        num_sms = 4
    pairs = batch * num_kv_heads
    if pairs >= 5 * num_sms:
        return _Split(1, 256, 1)
    if pairs >= 3 * num_sms:
        splits = max(1, min(2, triton.cdiv(max_context, 512)))
        return _Split(splits, 512, splits)
    wanted = triton.cdiv(32 * num_sms, pairs)
    if 2 * pairs > num_sms:
        splits = max(1, min(wanted, _SPLITS_CAP, triton.cdiv(max_context, 256)))
        return _Split(splits, 256, splits)
    splits = max(1, min(wanted, _SPLITS_CAP, triton.cdiv(max_context, 64)))
    grid = min(splits, triton.cdiv(_GRID_PROGRAMS_PER_SM * num_sms, pairs))
    return _Split(splits, 64, grid)
