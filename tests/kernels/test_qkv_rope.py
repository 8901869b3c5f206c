"""The qkv GEMM ending in q/k norm + rotary + the KV store (kernels/qkv_rope.py) against the
Triton GEMM followed by `qk_norm_rope_store_kv` (interpreter on the CPU, float16; bf16 in
tests/gpu)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE


def _case(m: int, num_q_heads: int, num_kv_heads: int, head_dim: int, hidden: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n = (num_q_heads + 2 * num_kv_heads) * head_dim
    x = torch.randn(m, hidden, generator=gen).half()
    w = (torch.randn(n, hidden, generator=gen) * 0.1).half()
    max_pos = 4096
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    emb = torch.outer(torch.arange(max_pos).float(), inv)
    emb = torch.cat((emb, emb), -1)
    cos, sin = emb.cos().half(), emb.sin().half()
    positions = torch.randint(0, max_pos, (m,), generator=gen, dtype=torch.int32)
    num_blocks, block_size = 2 * m + 3, 16
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:m].to(torch.int64)
    slots[1::5] = -1  # padding rows of a replayed graph write nowhere
    cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).half()
    q_w = (torch.rand(head_dim, generator=gen) + 0.5).half()
    k_w = (torch.rand(head_dim, generator=gen) + 0.5).half()
    return x, w, positions, cos, sin, cache, slots, q_w, k_w


@pytest.mark.parametrize(
    ("m", "num_q_heads", "num_kv_heads", "head_dim", "hidden", "config"),
    [
        (1, 4, 2, 128, 256, None),  # Qwen3's head_dim: two 64-column tiles per head
        (9, 2, 1, 64, 128, None),  # one tile per head
        (20, 4, 2, 128, 192, (1, 16, 64, 64, 4, 2)),  # two token tiles: counters per tile
        (70, 2, 2, 128, 128, None),  # past 64 tokens: 64-token tiles
        (33, 2, 1, 128, 64, (1, 64, 64, 64, 4, 2, False)),  # token rows on the MMA's M side
    ],
)
@pytest.mark.parametrize("with_norm", [True, False])
def test_qkv_rope_equals_gemm_then_qk_norm_rope_store_kv(
    m, num_q_heads, num_kv_heads, head_dim, hidden, config, with_norm
) -> None:
    from minivllm.kernels.linear import linear
    from minivllm.kernels.qk_norm_rope import qk_norm_rope_store_kv
    from minivllm.kernels.qkv_rope import num_rope_counters, qkv_rope_store_kv

    x, w, positions, cos, sin, cache, slots, q_w, k_w = _case(
        m, num_q_heads, num_kv_heads, head_dim, hidden, m + head_dim
    )
    norm = {"q_weight": q_w, "k_weight": k_w} if with_norm else {}
    x, w, positions, cos, sin, slots = (t.to(DEVICE) for t in (x, w, positions, cos, sin, slots))
    norm = {name: t.to(DEVICE) for name, t in norm.items()}
    k_expect, v_expect = cache.clone().to(DEVICE), (cache + 1).to(DEVICE)
    qkv = linear(x, w, config=config)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], -1)
    expect_q = qk_norm_rope_store_kv(
        q.view(m, num_q_heads, head_dim),
        k.view(m, num_kv_heads, head_dim),
        v.view(m, num_kv_heads, head_dim),
        positions,
        cos,
        sin,
        k_expect,
        v_expect,
        slots,
        **norm,
    )
    counters = torch.zeros(num_rope_counters(num_q_heads, num_kv_heads), dtype=torch.int32)
    counters = counters.to(DEVICE)
    for _ in range(2):  # the counters left zero: a second call the same
        k_cache, v_cache = cache.clone().to(DEVICE), (cache + 1).to(DEVICE)
        got_q = qkv_rope_store_kv(
            x, w, num_q_heads, positions, cos, sin, k_cache, v_cache, slots, counters,
            config=config, **norm,
        )  # fmt: skip
        assert not counters.any()
        assert got_q.shape == (m, num_q_heads, head_dim) and got_q.is_contiguous()
        torch.testing.assert_close(got_q.cpu(), expect_q.cpu(), atol=0, rtol=0)
        torch.testing.assert_close(k_cache.cpu(), k_expect.cpu(), atol=0, rtol=0)
        torch.testing.assert_close(v_cache.cpu(), v_expect.cpu(), atol=0, rtol=0)
    assert not torch.equal(k_cache.cpu(), cache) and not torch.equal(v_cache.cpu(), cache + 1)


def test_supports_rope_needs_whole_heads_per_tile() -> None:
    from minivllm.kernels.qkv_rope import supports_rope

    x = torch.zeros(4, 64, dtype=torch.float16)
    assert supports_rope(x, torch.zeros(4 * 128, 64, dtype=torch.float16), 128)
    assert supports_rope(x, torch.zeros(4 * 64, 64, dtype=torch.float16), 64)
    assert not supports_rope(x, torch.zeros(4 * 32, 64, dtype=torch.float16), 32)  # 64-wide tiles
    assert not supports_rope(
        torch.zeros(200, 64, dtype=torch.float16), torch.zeros(512, 64).half(), 128
    )


@pytest.mark.parametrize("tokens", [1, 6, 40])
def test_qkv_layer_rope_store_kv_matches_the_rotary_layer(monkeypatch, tokens: int) -> None:
    """QKVParallelLinear.rope_store_kv with ROPE_IN_GEMM_MAX_TOKENS on (interpreter, float16):
    q and the cache equal the layer, the rotary layer and its store; None past the bound, with
    no cache write to fuse, or off."""
    from minivllm.layers import fused_kernels
    from minivllm.layers import linear as linear_layers
    from minivllm.layers.attention import KVCacheWrite
    from minivllm.layers.rmsnorm import RMSNorm
    from minivllm.layers.rotary import RotaryEmbedding

    hidden, hq, hkv, d = 128, 4, 2, 64
    monkeypatch.setattr(linear_layers, "ROPE_IN_GEMM_MAX_TOKENS", 32)
    with torch.device("cpu"):
        proj = linear_layers.QKVParallelLinear(hidden, d, hq, hkv)
    assert proj.rope_kernels is None  # built without the fused path
    proj.gemm = fused_kernels("linear", True)
    proj.rope_kernels = fused_kernels("qkv_rope", True)
    proj.rope_counters = torch.zeros(
        proj.rope_kernels.num_rope_counters(hq, hkv), dtype=torch.int32
    )
    gen = torch.Generator().manual_seed(tokens)
    proj.weight.data = (torch.randn(proj.weight.shape, generator=gen) * 0.1).half()
    rotary = RotaryEmbedding(d, 512, 1e6, fused=True).half()
    q_norm, k_norm = (RMSNorm(d, fused=True).half() for _ in range(2))
    for norm in (q_norm, k_norm):
        norm.weight.data = (torch.rand(d, generator=gen) + 0.5).half()
    x = torch.randn(tokens, hidden, generator=gen).half()
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    slots = torch.randperm(8 * 16, generator=gen)[:tokens]
    cache = torch.randn(8, 16, hkv, d, generator=gen).half()

    k_expect, v_expect = cache.clone(), cache.clone()
    q, k, v = proj(x).split([hq * d, hkv * d, hkv * d], -1)
    write = KVCacheWrite(v.view(tokens, hkv, d), k_expect, v_expect, slots)
    expect_q, no_k = rotary(
        positions, q.view(tokens, hq, d), k.view(tokens, hkv, d), q_norm, k_norm, write
    )
    assert no_k is None
    k_cache, v_cache = cache.clone(), cache.clone()
    write = KVCacheWrite(None, k_cache, v_cache, slots)
    got_q = proj.rope_store_kv(x, positions, rotary, q_norm, k_norm, write)
    if tokens > 32:
        assert got_q is None and torch.equal(k_cache, cache)
        return
    assert proj.rope_store_kv(x, positions, rotary, q_norm, k_norm, None) is None
    torch.testing.assert_close(got_q, expect_q, atol=0, rtol=0)
    torch.testing.assert_close(k_cache, k_expect, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, v_expect, atol=0, rtol=0)
