"""Triton kv_store against the torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE
from minivllm.kernels import reference
from minivllm.kernels.kv_store import store_kvcache


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (2, 128), (8, 64), (3, 32)])
@pytest.mark.parametrize("block_size", [16, 256])
def test_store_kvcache(dtype, num_kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(block_size + num_kv_heads)
    num_blocks, num_tokens = 5, 37
    # key/value as strided views into a fused qkv buffer, like the model produces them
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, generator=gen).to(dtype).to(DEVICE)
    key = qkv[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    value = qkv[:, 2 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[0, 5, 36]] = -1  # padded CUDA-graph rows
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)  # poison: random old contents
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    k_expect, v_expect = k_cache.clone(), v_cache.clone()
    for slot_dtype in (torch.int32, torch.int64):
        slot_mapping = slots.to(slot_dtype).to(DEVICE)
        store_kvcache(key, value, k_cache, v_cache, slot_mapping)
        reference.store_kvcache(key, value, k_expect, v_expect, slot_mapping)
        assert torch.equal(k_cache, k_expect)
        assert torch.equal(v_cache, v_expect)


def test_store_kvcache_padded_head_stride():
    """Heads not adjacent in memory (head stride > head_dim): the per-head path."""
    wide = torch.randn(9, 2, 2 * 64, device=DEVICE)
    key, value = wide[:, :, :64], wide[:, :, 64:]
    k_cache = torch.randn(3, 16, 2, 64, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    k_expect, v_expect = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([3, 40, -1, 0, 17, 33, 47, -1, 5], dtype=torch.int64, device=DEVICE)
    store_kvcache(key, value, k_cache, v_cache, slots, block_t=2)
    reference.store_kvcache(key, value, k_expect, v_expect, slots)
    assert torch.equal(k_cache, k_expect) and torch.equal(v_cache, v_expect)


def test_store_kvcache_empty():
    k_cache = torch.zeros(2, 16, 2, 64, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    empty = torch.empty(0, 2, 64, device=DEVICE)
    store_kvcache(empty, empty, k_cache, v_cache, torch.empty(0, dtype=torch.int32, device=DEVICE))
    assert not k_cache.any() and not v_cache.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_norm", [True, False])  # Qwen3, Qwen2
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (6, 3, 32)])
@pytest.mark.parametrize("block_size", [1, 16])
def test_qk_norm_rope_store_kv(dtype, with_norm, num_heads, num_kv_heads, head_dim, block_size):
    """The fused q/k-norm + rotary + KV store writes exactly what qk_norm_rope followed by
    store_kvcache writes: the new tokens' slots, nothing for slot -1, every other slot untouched;
    and returns the same q."""
    from minivllm.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_store_kv

    gen = torch.Generator().manual_seed(block_size * 97 + num_heads * 7 + head_dim)
    num_tokens, max_position = 19, 300
    num_blocks = -(-40 // block_size) + 2
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    # q, k and v as strided views into the packed qkv projection output, as in the model.
    qkv = (2 * torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen)).to(dtype).to(DEVICE)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen).to(DEVICE)
    angles = torch.rand(max_position, head_dim // 2, generator=gen) * 6.3
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype).to(DEVICE)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype).to(DEVICE)
    norm_args = {}
    if with_norm:
        weights = (torch.rand(2, head_dim, generator=gen) + 0.5).to(dtype).to(DEVICE)
        norm_args = {"q_weight": weights[0], "k_weight": weights[1], "q_eps": 1e-6, "k_eps": 1e-5}
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[0, 7, num_tokens - 1]] = -1  # padded CUDA-graph rows
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_old = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)  # poison: random old contents
    v_old = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    expect_q, rope_k = qk_norm_rope(q, k, positions, cos, sin, **norm_args)
    k_expect, v_expect = k_old.clone(), v_old.clone()
    store_kvcache(rope_k, v, k_expect, v_expect, slots.to(DEVICE))
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    # early_loads (position, slot and cos / sin read before the PDL wait) computes the same.
    for slot_dtype, early_loads in ((torch.int32, False), (torch.int64, True)):
        k_cache, v_cache = k_old.clone(), v_old.clone()
        got_q = qk_norm_rope_store_kv(
            q,
            k,
            v,
            positions,
            cos,
            sin,
            k_cache,
            v_cache,
            slots.to(slot_dtype).to(DEVICE),
            **norm_args,
            q_out=torch.full_like(expect_q, float("nan")),
            early_loads=early_loads,
        )
        assert torch.equal(got_q, expect_q)
        assert torch.equal(k_cache, k_expect)
        assert torch.equal(v_cache, v_expect)
        for cache, old in ((k_cache, k_old), (v_cache, v_old)):
            flat, flat_old = cache.view(-1, kv_size), old.view(-1, kv_size)
            assert torch.equal(flat[untouched.to(DEVICE)], flat_old[untouched.to(DEVICE)])
            assert not torch.equal(flat[slots[1]], flat_old[slots[1]])  # a real slot was written


def test_qk_norm_rope_store_kv_empty():
    from minivllm.kernels.qk_norm_rope import qk_norm_rope_store_kv

    k_cache = torch.zeros(2, 16, 2, 64, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    q = torch.empty(0, 4, 64, device=DEVICE)
    kv = torch.empty(0, 2, 64, device=DEVICE)
    table = torch.ones(10, 64, device=DEVICE)
    none = torch.empty(0, dtype=torch.int32, device=DEVICE)
    got_q = qk_norm_rope_store_kv(q, kv, kv, none, table, table, k_cache, v_cache, none)
    assert got_q.shape == q.shape
    assert not k_cache.any() and not v_cache.any()
