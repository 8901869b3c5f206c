"""The qkv and gate/up GEMMs with their epilogues (kernels/fused_gemm.py) against plain torch: the
projection in float32 rounded to the dtype, then the torch norm / rotary / SiLU layers and a cache
write by slot (interpreter on the CPU; bf16 in tests/gpu)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, poison_like
from minivllm.layers.rmsnorm import RMSNorm
from minivllm.layers.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.float16]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    # float16: the GEMM's sum order may flip the projection's last bit, which the norm and rope
    # carry through (a couple of ulps of the output).
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 8e-3, "rtol": 4e-3}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [True, False])  # Qwen3, Qwen2
@pytest.mark.parametrize(
    ("num_tokens", "num_heads", "num_kv_heads", "head_dim", "config"),
    [
        (1, 4, 2, 64, None),
        (5, 8, 2, 32, (16, 32, 4, 2)),
        (37, 4, 4, 64, (32, 64, 4, 3)),  # tokens not a multiple of BM: masked rows
    ],
)
def test_qkv_norm_rope_matches_the_unfused_layers(
    num_tokens, num_heads, num_kv_heads, head_dim, config, with_norm, dtype
) -> None:
    from minivllm.kernels.fused_gemm import qkv_norm_rope

    gen = _gen(num_tokens * 7 + head_dim)
    hidden, max_position, block_size, num_blocks = 128, 200, 4, 24
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    size = (num_heads + 2 * num_kv_heads) * head_dim
    w = (torch.randn(size, hidden, generator=gen) * 0.1).to(dtype)
    rope = RotaryEmbedding(head_dim, max_position, base=10000.0).to(dtype)
    q_norm = k_norm = None
    if with_norm:
        q_norm = RMSNorm(head_dim, eps=1e-6).to(dtype)
        k_norm = RMSNorm(head_dim, eps=1e-5).to(dtype)
        q_norm.weight.copy_(torch.rand(head_dim, generator=gen) + 0.5)
        k_norm.weight.copy_(torch.rand(head_dim, generator=gen) + 0.5)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen, dtype=torch.int32)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(torch.int32)
    slots[num_tokens // 2] = -1  # a padding row of a replayed graph: writes no slot
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype)

    qkv = (x.float() @ w.float().T).to(dtype)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    expect_q, expect_k = rope(
        positions.long(),
        q.reshape(num_tokens, num_heads, head_dim),
        k.reshape(num_tokens, num_kv_heads, head_dim),
        q_norm,
        k_norm,
    )
    expect_k_cache, expect_v_cache = k_cache.clone(), v_cache.clone()
    written = slots >= 0
    flat = (num_blocks * block_size, num_kv_heads, head_dim)
    expect_k_cache.view(flat)[slots[written].long()] = expect_k[written]
    expect_v_cache.view(flat)[slots[written].long()] = v.reshape(-1, num_kv_heads, head_dim)[
        written
    ]

    got_k_cache, got_v_cache = k_cache.to(DEVICE), v_cache.to(DEVICE)
    got_q = qkv_norm_rope(
        x.to(DEVICE),
        w.to(DEVICE),
        positions.to(DEVICE),
        rope.cos_cache.to(DEVICE),
        rope.sin_cache.to(DEVICE),
        got_k_cache,
        got_v_cache,
        slots.to(DEVICE),
        num_heads,
        q_weight=q_norm.weight.to(DEVICE) if with_norm else None,
        k_weight=k_norm.weight.to(DEVICE) if with_norm else None,
        q_eps=q_norm.eps if with_norm else 0.0,
        k_eps=k_norm.eps if with_norm else 0.0,
        config=config,
        q_out=poison_like(expect_q).to(DEVICE),
    )
    tol = _tol(dtype)
    torch.testing.assert_close(got_q.cpu(), expect_q, **tol)
    torch.testing.assert_close(got_k_cache.cpu(), expect_k_cache, **tol)
    torch.testing.assert_close(got_v_cache.cpu(), expect_v_cache, **tol)
    # Slots no row names keep their contents exactly.
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[written].long()] = False
    assert torch.equal(got_k_cache.cpu().view(flat)[untouched], k_cache.view(flat)[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_tokens", "d", "config"),
    [(1, 64, None), (9, 128, (16, 32, 64, 4, 2)), (70, 64, (64, 64, 32, 4, 3))],
)
def test_gate_up_silu_matches_the_unfused_layers(num_tokens, d, config, dtype) -> None:
    from minivllm.kernels.fused_gemm import gate_up_silu

    gen = _gen(num_tokens + d)
    hidden = 128
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    w = (torch.randn(2 * d, hidden, generator=gen) * 0.2).to(dtype)
    gate, up = (x.float() @ w.float().T).to(dtype).chunk(2, dim=-1)
    expect = F.silu(gate) * up
    got = gate_up_silu(x.to(DEVICE), w.to(DEVICE), config=config,
                       out=poison_like(expect).to(DEVICE))
    torch.testing.assert_close(got.cpu(), expect, **_tol(dtype))
