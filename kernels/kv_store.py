"""Write the new tokens' K and V into the paged KV cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(
    key_ptr,  # [T, num_kv_heads, head_dim]
    value_ptr,  # [T, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    slot_mapping_ptr,  # [T] int32/int64
    num_tokens,
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,  # next power of two >= NUM_KV_HEADS
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
    FLAT: tl.constexpr,  # heads of a token are contiguous in key/value: copy [BLOCK_T, H * D]
):
    # One program moves BLOCK_T tokens x all KV heads: whole 16-byte-aligned rows, thousands of
    # programs for a prefill chunk.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.load(slot_mapping_ptr + offs_t, mask=offs_t < num_tokens, other=-1).to(tl.int64)
    tok = offs_t.to(tl.int64)
    ROW: tl.constexpr = NUM_KV_HEADS * HEAD_DIM  # cache slot stride
    if FLAT:
        offs = tl.arange(0, BLOCK_H * BLOCK_D)  # == ROW, a power of two
        mask = (slots >= 0)[:, None]
        src_k = key_ptr + tok[:, None] * stride_key_t + offs[None, :]
        src_v = value_ptr + tok[:, None] * stride_value_t + offs[None, :]
        dst = slots[:, None] * ROW + offs[None, :]  # int64: slot * ROW can pass 2^31
    else:
        offs_h = tl.arange(0, BLOCK_H)[None, :, None]
        offs_d = tl.arange(0, BLOCK_D)[None, None, :]
        mask = (slots[:, None, None] >= 0) & (offs_h < NUM_KV_HEADS) & (offs_d < HEAD_DIM)
        tok3 = tok[:, None, None]
        src_k = key_ptr + tok3 * stride_key_t + offs_h * stride_key_h + offs_d
        src_v = value_ptr + tok3 * stride_value_t + offs_h * stride_value_h + offs_d
        dst = slots[:, None, None] * ROW + offs_h * HEAD_DIM + offs_d
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    value: torch.Tensor,  # [T, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int32/int64, slots < 0 skipped
    *,
    block_t: int = 16,
    num_warps: int = 8,
) -> None:
    """Write each token's K/V into cache slot `slot_mapping[t]` (block_id * block_size + offset).

    `block_t` (tokens per program) and `num_warps` tune the launch (benchmarks).
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, (value.shape, key.shape)
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert key.stride(2) == 1 and value.stride(2) == 1, "head_dim must be contiguous"
    assert slot_mapping.shape == (num_tokens,)
    assert slot_mapping.dtype in (torch.int32, torch.int64)
    if num_tokens == 0:
        return
    # Default 16 tokens x 8 heads x 128 dims = 32 KB per tensor per program over 8 warps: four
    # 16-byte loads in flight per thread and tensor, 512 programs for an 8192-token chunk. The
    # best of bench_decode_attention.py's sweep (4..64 tokens, 4..16 warps), by a small margin.
    block_h, block_d = triton.next_power_of_2(num_kv_heads), triton.next_power_of_2(head_dim)
    flat = (
        block_h == num_kv_heads
        and block_d == head_dim
        and key.stride(1) == head_dim
        and value.stride(1) == head_dim
    )
    grid = (triton.cdiv(num_tokens, block_t),)
    _store_kvcache_kernel[grid](
        key_ptr=key,
        value_ptr=value,
        k_cache_ptr=k_cache,
        v_cache_ptr=v_cache,
        slot_mapping_ptr=slot_mapping,
        num_tokens=num_tokens,
        stride_key_t=key.stride(0),
        stride_key_h=key.stride(1),
        stride_value_t=value.stride(0),
        stride_value_h=value.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        FLAT=flat,
        num_warps=num_warps,
    )
