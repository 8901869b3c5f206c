"""Triton: fused sampling for rows without top-k / top-p / min-p filtering.

The vocabulary is split into chunks so that a few rows still fill the GPU. Two kernels, no host
sync, a grid fixed by (rows, vocab): graph capturable.
1. `_chunk_stats_kernel`, one program per (row, chunk): for a sampling row the chunk's max of the
   tempered logits and its sum of exp(. - max) in float32 (in base 2: exp2); for a greedy row the
   chunk's max and first argmax of the raw logits. Written to a [3, S, C] float32 scratch.
2. `_sample_chunks_kernel`, one program per row: a greedy row takes the first argmax over the
   chunks. A sampling row rescales the chunk sums to the row's max, takes the first chunk whose
   inclusive prefix mass exceeds u * total, and scans only that chunk with tl.cumsum for the first
   index whose running mass exceeds the rest: the inverse CDF of `layers/sampler.py`.
A token whose exp is 0 (underflow, or a -inf logit) is never drawn.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_scale(temperature_ptr, top_k_ptr, row, HAS_TOP_K: tl.constexpr):
    """(is_greedy, scale) with z = logits * scale: exp(logits / t) = exp2(z) for sampling rows
    (log2(e) folded in saves a multiply per logit), z = the raw logits for greedy rows
    (temperature 0, or top_k 1)."""
    t = tl.load(temperature_ptr + row)
    is_greedy = t == 0.0
    if HAS_TOP_K:
        is_greedy = is_greedy | (tl.load(top_k_ptr + row) == 1)
    log2_e = 1.4426950408889634
    return is_greedy, tl.where(is_greedy, 1.0, log2_e / tl.where(is_greedy, 1.0, t))


@triton.jit
def _chunk_stats_kernel(
    logits_ptr,  # [S, V], vocab contiguous
    temperature_ptr,  # [S] float32, 0 = greedy
    top_k_ptr,  # [S] int32, 1 = greedy, read when HAS_TOP_K
    chunk_max_ptr,  # [S, C] float32: max of z over the chunk (-inf if all -inf)
    chunk_sum_ptr,  # [S, C] float32: sum of exp2(z - max(chunk max, -3e38)); 0 if greedy
    chunk_argmax_ptr,  # [S, C] int32: vocab index of the chunk's first max if greedy
    stride_row,
    vocab_size,
    num_chunks,
    HAS_TOP_K: tl.constexpr,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    is_greedy, scale = _row_scale(temperature_ptr, top_k_ptr, row, HAS_TOP_K)
    idx = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(
        logits_ptr + row.to(tl.int64) * stride_row + idx,
        mask=idx < vocab_size,
        other=-float("inf"),
    )
    z = x.to(tl.float32) * scale
    # Greedy rows need only the argmax, sampling rows only max and sum: each skips the other's
    # reduction, a measurable share of both kernels' time.
    if is_greedy:
        m, arg = tl.max(z, axis=0, return_indices=True, return_indices_tie_break_left=True)
        s = 0.0
    else:
        m = tl.max(z, axis=0)
        arg = 0
        # A finite shift keeps an all -inf chunk's sum at 0 instead of NaN.
        s = tl.sum(tl.exp2(z - tl.maximum(m, -3.0e38)), axis=0)
    out = row * num_chunks + chunk
    tl.store(chunk_max_ptr + out, m)
    tl.store(chunk_sum_ptr + out, s)
    tl.store(chunk_argmax_ptr + out, chunk * CHUNK + arg)


@triton.jit
def _sample_chunks_kernel(
    logits_ptr,  # [S, V], vocab contiguous
    temperature_ptr,  # [S] float32, 0 = greedy
    top_k_ptr,  # [S] int32, 1 = greedy, read when HAS_TOP_K
    uniforms_ptr,  # [S] float32 in [0, 1)
    chunk_max_ptr,  # [S, C] float32
    chunk_sum_ptr,  # [S, C] float32
    chunk_argmax_ptr,  # [S, C] int32
    out_ptr,  # [S] int64
    stride_row,
    vocab_size,
    num_chunks,
    HAS_TOP_K: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    is_greedy, scale = _row_scale(temperature_ptr, top_k_ptr, row, HAS_TOP_K)
    u = tl.load(uniforms_ptr + row)

    c = tl.arange(0, BLOCK_C)
    c_mask = c < num_chunks
    stats = row * num_chunks + c
    m = tl.load(chunk_max_ptr + stats, mask=c_mask, other=-float("inf"))

    # Greedy: chunks are in vocab order, so the first chunk holding the max has the first argmax.
    arg = tl.load(chunk_argmax_ptr + stats, mask=c_mask, other=0)
    greedy_idx = tl.min(tl.where(c_mask & (m == tl.max(m, axis=0)), arg, vocab_size), axis=0)

    # The chunk: the first with positive mass whose inclusive prefix exceeds u * total (tl.cumsum
    # is a parallel scan, not bitwise monotone); if rounding leaves none, the last with mass.
    shift = tl.maximum(m, -3.0e38)  # as in _chunk_stats_kernel
    chunk_scale = tl.exp2(shift - tl.max(shift, axis=0))
    mass = tl.load(chunk_sum_ptr + stats, mask=c_mask, other=0.0) * chunk_scale
    cum = tl.cumsum(mass, axis=0)
    target = u * tl.sum(mass, axis=0)
    positive = mass > 0.0
    chosen = tl.min(tl.where(positive & (cum > target), c, BLOCK_C), axis=0)
    chosen = tl.where(chosen < BLOCK_C, chosen, tl.max(tl.where(positive, c, 0), axis=0))
    is_chosen = c == chosen
    # The rest of the target in the chunk's own units exp2(z - shift). Its scale is > 0 where its
    # mass is; 0 only in a row without mass (greedy, or all -inf), whose draw does not matter.
    chosen_scale = tl.sum(tl.where(is_chosen, chunk_scale, 0.0), axis=0)
    before = tl.sum(tl.where(is_chosen, cum - mass, 0.0), axis=0)
    rest = (target - before) / tl.where(chosen_scale > 0.0, chosen_scale, 1.0)
    chosen_shift = tl.sum(tl.where(is_chosen, shift, 0.0), axis=0)

    # Scan the chunk: the first index whose running mass exceeds the rest; a zero-mass token never
    # qualifies; rounding that leaves none takes the chunk's last positive token.
    idx = chosen * CHUNK + tl.arange(0, CHUNK)
    in_vocab = idx < vocab_size
    x = tl.load(
        logits_ptr + row.to(tl.int64) * stride_row + idx, mask=in_vocab, other=-float("inf")
    )
    e = tl.exp2(x.to(tl.float32) * scale - chosen_shift)
    drawable = in_vocab & (e > 0.0)
    hit = tl.min(tl.where(drawable & (tl.cumsum(e, axis=0) > rest), idx, vocab_size), axis=0)
    sampled = tl.where(hit < vocab_size, hit, tl.max(tl.where(drawable, idx, 0), axis=0))
    tl.store(out_ptr + row, tl.where(is_greedy, greedy_idx, sampled).to(tl.int64))


def sample_from_logits(
    logits: torch.Tensor,  # [S, V] float32 / float16 / bfloat16
    temperature: torch.Tensor,  # [S] float32, 0 = greedy
    uniforms: torch.Tensor,  # [S] float32 in [0, 1)
    top_k: torch.Tensor | None = None,  # [S] int32: rows with 1 are greedy, others unfiltered
    *,
    out: torch.Tensor | None = None,  # [S] int64
    chunk_size: int = 4096,
    num_warps: int = 4,
) -> torch.Tensor:  # [S] int64
    """Inverse-CDF sample of softmax(logits / temperature) at u per row; argmax where greedy.

    No top-k / top-p / min-p filtering: the caller routes rows that need it to the torch path.
    """
    assert logits.dim() == 2 and logits.stride(1) == 1, (logits.shape, logits.stride())
    assert logits.dtype in (torch.float32, torch.float16, torch.bfloat16), logits.dtype
    num_rows, vocab_size = logits.shape
    assert temperature.shape == (num_rows,) and temperature.dtype == torch.float32
    assert uniforms.shape == (num_rows,) and uniforms.dtype == torch.float32
    assert temperature.is_contiguous() and uniforms.is_contiguous()
    if top_k is not None:
        assert top_k.shape == (num_rows,) and top_k.dtype == torch.int32 and top_k.is_contiguous()
    assert chunk_size > 0 and chunk_size & (chunk_size - 1) == 0, chunk_size  # for tl.arange
    if out is None:
        out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    assert out.shape == (num_rows,) and out.dtype == torch.int64
    if num_rows == 0:
        return out
    num_chunks = triton.cdiv(vocab_size, chunk_size)
    scratch = torch.empty(3, num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    chunk_max, chunk_sum, chunk_argmax = scratch[0], scratch[1], scratch[2].view(torch.int32)
    # 4096 logits per chunk over 4 warps: 32 per thread (four 16-byte bf16 loads in flight), 38
    # chunks for Qwen's 151936-entry vocabulary, one chunk's tl.cumsum in registers. The best of
    # 2048 / 4096 / 8192 logits and 4 / 8 warps at 256 rows, and near the best at 8.
    top_k_ptr = top_k if top_k is not None else temperature
    _chunk_stats_kernel[(num_rows, num_chunks)](
        logits_ptr=logits,
        temperature_ptr=temperature,
        top_k_ptr=top_k_ptr,
        chunk_max_ptr=chunk_max,
        chunk_sum_ptr=chunk_sum,
        chunk_argmax_ptr=chunk_argmax,
        stride_row=logits.stride(0),
        vocab_size=vocab_size,
        num_chunks=num_chunks,
        HAS_TOP_K=top_k is not None,
        CHUNK=chunk_size,
        num_warps=num_warps,
    )
    _sample_chunks_kernel[(num_rows,)](
        logits_ptr=logits,
        temperature_ptr=temperature,
        top_k_ptr=top_k_ptr,
        uniforms_ptr=uniforms,
        chunk_max_ptr=chunk_max,
        chunk_sum_ptr=chunk_sum,
        chunk_argmax_ptr=chunk_argmax,
        out_ptr=out,
        stride_row=logits.stride(0),
        vocab_size=vocab_size,
        num_chunks=num_chunks,
        HAS_TOP_K=top_k is not None,
        CHUNK=chunk_size,
        BLOCK_C=triton.next_power_of_2(num_chunks),
        num_warps=num_warps,
    )
    return out
