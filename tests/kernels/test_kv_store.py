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
