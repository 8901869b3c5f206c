"""Triton: fused sampling for rows without top-k / top-p / min-p filtering.

One program per row, two passes over the vocabulary in chunks:
1. online max and sum of exp(logits / temperature - max) in float32, plus the first argmax;
2. running cumulative sum (tl.cumsum inside a chunk), stopping at the first index whose
   cumulative mass exceeds u * total: the inverse CDF of `layers/sampler.py`.
Rows with temperature 0 (or top_k 1) return the argmax. No host syncs: graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sample_kernel(
    logits_ptr,  # [S, V], vocab contiguous
    temperature_ptr,  # [S] float32, 0 = greedy
    top_k_ptr,  # [S] int32, 1 = greedy (other values are not applied), read when HAS_TOP_K
    uniforms_ptr,  # [S] float32 in [0, 1)
    out_ptr,  # [S] int64
    stride_row,
    vocab_size,
    HAS_TOP_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    t = tl.load(temperature_ptr + row)
    is_greedy = t == 0.0
    if HAS_TOP_K:
        is_greedy = is_greedy | (tl.load(top_k_ptr + row) == 1)
    inv_t = 1.0 / tl.where(is_greedy, 1.0, t)
    u = tl.load(uniforms_ptr + row)
    offs = tl.arange(0, BLOCK_V)

    # Pass 1: max / sum of the tempered logits, and argmax of the raw ones (first index on ties).
    # A finite start keeps exp(m_old - m_new) free of inf - inf.
    m = -3.0e38
    s = 0.0
    best = -float("inf")
    best_idx = 0
    for start in range(0, vocab_size, BLOCK_V):
        idx = start + offs
        mask = idx < vocab_size
        x = tl.load(base + idx, mask=mask, other=-float("inf")).to(tl.float32)
        chunk_max, chunk_idx = tl.max(
            x, axis=0, return_indices=True, return_indices_tie_break_left=True
        )
        best_idx = tl.where(chunk_max > best, start + chunk_idx, best_idx)  # strict: first wins
        best = tl.maximum(best, chunk_max)
        z = x * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new

    # Pass 2: first index whose running mass exceeds u * s; a zero-mass token never qualifies.
    target = u * s
    found = vocab_size
    last_positive = 0
    running = 0.0
    for start in range(0, vocab_size, BLOCK_V):
        idx = start + offs
        mask = idx < vocab_size
        x = tl.load(base + idx, mask=mask, other=-float("inf")).to(tl.float32)
        e = tl.exp(x * inv_t - m)
        cdf = running + tl.cumsum(e, axis=0)
        positive = mask & (e > 0.0)
        hit = tl.min(tl.where(positive & (cdf > target), idx, vocab_size), axis=0)
        found = tl.minimum(found, hit)
        last_positive = tl.maximum(last_positive, tl.max(tl.where(positive, idx, 0), axis=0))
        running += tl.sum(e, axis=0)
    # Rounding can leave the chunked total a hair below s: then the last positive token is drawn.
    sampled = tl.where(found < vocab_size, found, last_positive)
    tl.store(out_ptr + row, tl.where(is_greedy, best_idx, sampled).to(tl.int64))


def sample_from_logits(
    logits: torch.Tensor,  # [S, V] float32 / float16 / bfloat16
    temperature: torch.Tensor,  # [S] float32, 0 = greedy
    uniforms: torch.Tensor,  # [S] float32 in [0, 1)
    top_k: torch.Tensor | None = None,  # [S] int32: rows with 1 are greedy, others unfiltered
    *,
    out: torch.Tensor | None = None,  # [S] int64
    block_v: int = 4096,
    num_warps: int = 8,
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
    if out is None:
        out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    assert out.shape == (num_rows,) and out.dtype == torch.int64
    if num_rows == 0:
        return out
    # 4096 logits per chunk over 8 warps: 16 per thread (two 16-byte bf16 loads), 38 chunks for
    # Qwen's 151936-entry vocabulary; tl.cumsum of a chunk stays in registers.
    _sample_kernel[(num_rows,)](
        logits_ptr=logits,
        temperature_ptr=temperature,
        top_k_ptr=top_k if top_k is not None else temperature,
        uniforms_ptr=uniforms,
        out_ptr=out,
        stride_row=logits.stride(0),
        vocab_size=vocab_size,
        HAS_TOP_K=top_k is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return out
