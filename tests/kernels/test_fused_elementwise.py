"""Fused elementwise kernels (RMSNorm with residual add, q/k norm + rotary, SiLU-and-mul) against
the torch code of the layers they replace (interpreter on the CPU).

The kernels repeat the torch ops' roundings, so float32 agrees to summation order and float16 to
one rounding of the last op. bfloat16 runs on the GPU only (tests/gpu): the interpreter's bf16
conversion does not round to nearest.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, make_paged_batch, poison_like
from minivllm.layers.attention import AttentionMetadata
from minivllm.layers.rmsnorm import RMSNorm
from minivllm.layers.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.float16]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    # float16: one ulp of the final rounding (rsqrt / exp differ from torch's in the last bit).
    return {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 1000])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm(num_tokens: int, hidden: int, dtype: torch.dtype, with_residual: bool) -> None:
    from minivllm.kernels.fused_norm import fused_add_rmsnorm, rmsnorm

    gen = _gen(num_tokens * hidden)
    norm = RMSNorm(hidden, eps=1e-6).to(dtype)
    norm.weight.copy_(torch.rand(hidden, generator=gen) + 0.5)
    # x is a column slice of a wider buffer: a row stride != hidden.
    wide = (3 * torch.randn(num_tokens, hidden + 16, generator=gen)).to(dtype)
    x = wide[:, 8 : 8 + hidden]
    residual = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    out = poison_like(torch.empty(num_tokens, hidden, dtype=dtype))
    if with_residual:
        residual_out = poison_like(residual)
        expect, expect_residual = norm(x, residual)
        got, got_residual = fused_add_rmsnorm(
            x.to(DEVICE),
            residual.to(DEVICE),
            norm.weight.to(DEVICE),
            norm.eps,
            out=out.to(DEVICE),
            residual_out=residual_out.to(DEVICE),
        )
        torch.testing.assert_close(got_residual.cpu(), expect_residual, atol=0, rtol=0)
    else:
        expect = norm(x)
        got = rmsnorm(x.to(DEVICE), norm.weight.to(DEVICE), norm.eps, out=out.to(DEVICE))
    torch.testing.assert_close(got.cpu(), expect, **_tol(dtype))


def test_fused_add_rmsnorm_in_place() -> None:
    """residual_out may be the residual buffer itself (each row is read before it is written)."""
    from minivllm.kernels.fused_norm import fused_add_rmsnorm

    gen = _gen(1)
    norm = RMSNorm(128, eps=1e-5)
    norm.weight.copy_(torch.rand(128, generator=gen))
    x, residual = torch.randn(5, 128, generator=gen), torch.randn(5, 128, generator=gen)
    expect, expect_residual = norm(x, residual)
    residual = residual.to(DEVICE)
    got, got_residual = fused_add_rmsnorm(
        x.to(DEVICE), residual, norm.weight.to(DEVICE), norm.eps, residual_out=residual
    )
    assert got_residual.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(got_residual.cpu(), expect_residual, atol=0, rtol=0)
    torch.testing.assert_close(got.cpu(), expect, **_tol(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("num_tokens", [1, 5, 17])
@pytest.mark.parametrize("with_norm", [True, False])
def test_qk_norm_rope(
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    with_norm: bool,
) -> None:
    from minivllm.kernels.qk_norm_rope import qk_norm_rope

    gen = _gen(num_tokens * 131 + num_heads * 7 + head_dim)
    max_position = 300
    rope = RotaryEmbedding(head_dim, max_position, base=10000.0).to(dtype)
    q_norm = k_norm = None
    if with_norm:
        q_norm, k_norm = (
            RMSNorm(head_dim, eps=1e-6).to(dtype),
            RMSNorm(head_dim, eps=1e-5).to(dtype),
        )
        q_norm.weight.copy_(torch.rand(head_dim, generator=gen) + 0.5)
        k_norm.weight.copy_(torch.rand(head_dim, generator=gen) + 0.5)
    # q and k are strided views into the packed qkv projection output, as in the model.
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = (2 * torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen)).to(dtype)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen, dtype=torch.int32)
    positions[0] = max_position - 1  # the table's last row
    expect_q, expect_k = rope(positions.long(), q, k, q_norm, k_norm)

    qkv_dev = qkv.to(DEVICE)
    q_dev, k_dev, _ = qkv_dev.split([q_size, kv_size, kv_size], dim=-1)
    got_q, got_k = qk_norm_rope(
        q_dev.view(num_tokens, num_heads, head_dim),
        k_dev.view(num_tokens, num_kv_heads, head_dim),
        positions.to(DEVICE),
        rope.cos_cache.to(DEVICE),
        rope.sin_cache.to(DEVICE),
        q_weight=q_norm.weight.to(DEVICE) if with_norm else None,
        k_weight=k_norm.weight.to(DEVICE) if with_norm else None,
        q_eps=q_norm.eps if with_norm else 0.0,
        k_eps=k_norm.eps if with_norm else 0.0,
        q_out=poison_like(expect_q).to(DEVICE),
        k_out=poison_like(expect_k).to(DEVICE),
        early_loads=with_norm,  # position and cos / sin before the PDL wait: the same result
    )
    if with_norm:
        tol = _tol(dtype)
    elif DEVICE == "cpu":
        tol = {"atol": 0.0, "rtol": 0.0}  # rope alone: the interpreter repeats torch's roundings
    else:
        # Compiled, the sum of the two rounded products may land one ulp off (of the operands'
        # magnitude, so large next to a result that cancels).
        bound = max(expect_q.abs().max().item(), expect_k.abs().max().item())
        tol = {"atol": 2 * torch.finfo(dtype).eps * bound, "rtol": 0.0}
    torch.testing.assert_close(got_q.cpu(), expect_q, **tol)
    torch.testing.assert_close(got_k.cpu(), expect_k, **tol)


class _DecodeStep(NamedTuple):
    q: torch.Tensor  # [T, num_heads, head_dim], a view of the packed qkv
    k: torch.Tensor  # [T, num_kv_heads, head_dim], a view of the packed qkv
    v: torch.Tensor  # [T, num_kv_heads, head_dim], a view of the packed qkv
    positions: torch.Tensor  # [T]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    meta: AttentionMetadata


def _decode_step(
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int
) -> _DecodeStep:
    """One decode token per sequence over a paged cache, plus a padding row (seq_len 0, slot -1,
    as in a replayed CUDA graph)."""
    seq_lens = [5, 17, 0, 33, 16]
    block_size = 16
    k_cache, v_cache, block_tables = make_paged_batch(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=seed
    )
    positions = torch.tensor([max(n - 1, 0) for n in seq_lens])
    slots = [
        int(block_tables[b, p // block_size]) * block_size + p % block_size if n > 0 else -1
        for b, (n, p) in enumerate(zip(seq_lens, positions.tolist()))
    ]
    num_tokens = len(seq_lens)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    gen = _gen(seed)
    qkv = (2 * torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen)).to(dtype).to(DEVICE)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    meta = AttentionMetadata(
        num_decodes=num_tokens,
        slot_mapping=torch.tensor(slots, dtype=torch.int32, device=DEVICE),
        decode_seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        decode_block_tables=block_tables,
        prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32, device=DEVICE),
        prefill_seq_lens=torch.zeros(0, dtype=torch.int32, device=DEVICE),
        prefill_block_tables=block_tables[:0],
        max_prefill_query_len=0,
    )
    return _DecodeStep(
        q.view(num_tokens, num_heads, head_dim),
        k.view(num_tokens, num_kv_heads, head_dim),
        v.view(num_tokens, num_kv_heads, head_dim),
        positions.to(DEVICE),
        k_cache,
        v_cache,
        meta,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [True, False])  # Qwen3, Qwen2
def test_rotary_layer_stores_kv_for_attention(dtype: torch.dtype, with_norm: bool) -> None:
    """The model's route on the fused path (triton backend): the rotary layer, handed the
    attention layer's kv_write, writes the cache and returns k = None, and the attention layer
    skips its store. Caches, q and attention output equal the unfused route (rotary returns k,
    the attention layer stores it), padding row included."""
    from minivllm.layers.attention import Attention, get_attention_backend

    num_heads, num_kv_heads, head_dim = 8, 2, 64
    # CUDA's choice, on the CPU too
    rope = RotaryEmbedding(head_dim, 64, base=10000.0, fused=True).to(dtype=dtype, device=DEVICE)
    q_norm = k_norm = None
    if with_norm:
        q_norm = RMSNorm(head_dim, eps=1e-6).to(dtype=dtype, device=DEVICE)
        k_norm = RMSNorm(head_dim, eps=1e-6).to(dtype=dtype, device=DEVICE)
        q_norm.weight.copy_(torch.rand(head_dim, generator=_gen(2)) + 0.5)
        k_norm.weight.copy_(torch.rand(head_dim, generator=_gen(3)) + 0.5)
    q, k, v, positions, k_cache, v_cache, meta = _decode_step(
        num_heads, num_kv_heads, head_dim, dtype, seed=4
    )
    backend = get_attention_backend("triton")
    assert backend.can_fuse_kv_store
    outs = []
    for fused in (False, True):
        attn = Attention(num_heads, num_kv_heads, head_dim, head_dim**-0.5, backend)
        attn.k_cache, attn.v_cache = k_cache.clone(), v_cache.clone()
        kv_write = attn.kv_write(v, meta) if fused else None
        rq, rk = rope(positions, q, k, q_norm, k_norm, kv_write=kv_write)
        assert (rk is None) == fused
        outs.append((rq, attn(rq, rk, v, meta), attn.k_cache, attn.v_cache))
    for unfused, fused in zip(*outs):
        assert torch.equal(fused, unfused)
    assert not torch.equal(outs[1][2], k_cache)  # the new tokens were written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_parts", [1, 2, 3])
@pytest.mark.parametrize("with_norm", [True, False])
def test_store_kv_adds_up_split_k_partials(dtype: torch.dtype, num_parts: int, with_norm: bool):
    """q, k and v as float32 split-K partial sums of the packed qkv ([S, T, N], views into the
    first): the kernel writes exactly what it writes for their float32 sum in split order rounded
    to the activation dtype, the GEMM's own output; the padding row (slot -1) writes nothing."""
    from minivllm.kernels.qk_norm_rope import qk_norm_rope_store_kv

    num_heads, num_kv_heads, head_dim = 8, 2, 64
    _, _, _, positions, k_cache, v_cache, meta = _decode_step(
        num_heads, num_kv_heads, head_dim, dtype, seed=6
    )
    num_tokens = positions.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    parts = torch.randn(num_parts, num_tokens, q_size + 2 * kv_size, generator=_gen(num_parts))
    total = parts[0].clone()
    for s in range(1, num_parts):
        total += parts[s]
    rope = RotaryEmbedding(head_dim, 64, base=10000.0).to(dtype)
    norms = {}
    if with_norm:
        weights = (torch.rand(2, head_dim, generator=_gen(7)) + 0.5).to(dtype).to(DEVICE)
        norms = {"q_weight": weights[0], "k_weight": weights[1], "q_eps": 1e-6, "k_eps": 1e-6}
    out = []
    for qkv, extra in (
        (total.to(dtype).to(DEVICE), {}),
        (parts.to(DEVICE)[0], {"num_parts": num_parts, "split_stride": parts.stride(0)}),
    ):
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        caches = (k_cache.clone(), v_cache.clone())
        q_out = qk_norm_rope_store_kv(
            q.view(num_tokens, num_heads, head_dim),
            k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim),
            positions,
            rope.cos_cache.to(DEVICE),
            rope.sin_cache.to(DEVICE),
            *caches,
            meta.slot_mapping,
            **norms,
            **extra,
        )
        assert q_out.dtype == dtype
        out.append((q_out[meta.decode_seq_lens > 0], *caches))
    for got, expect in zip(out[1], out[0], strict=True):
        assert torch.equal(got, expect)
    assert not torch.equal(out[1][1], k_cache) and not torch.equal(out[1][2], v_cache)


def test_the_shared_rotary_table_follows_the_fused_choice(monkeypatch) -> None:
    """get_rotary_embedding shares one instance per shape and fused-kernel choice: a model built
    for the fused layers after one built without them (same shape) gets the fused kernel."""
    import minivllm.layers
    from minivllm.layers.rotary import get_rotary_embedding

    args = (32, 64, 10000.0, torch.float32, torch.device("cpu"))
    monkeypatch.setattr(minivllm.layers, "fused_kernels_on", lambda device: False)
    plain = get_rotary_embedding(*args)
    monkeypatch.setattr(minivllm.layers, "fused_kernels_on", lambda device: True)
    fused = get_rotary_embedding(*args)
    assert plain.kernels is None and fused.kernels is not None
    assert get_rotary_embedding(*args) is fused


def test_kv_write_ignored_off_the_fused_path() -> None:
    """CPU tensors (and MINIVLLM_FUSED_KERNELS=0) take the torch path: kv_write is ignored, k comes
    back for the attention layer's own store; the torch backend never hands out a kv_write."""
    from minivllm.layers.attention import Attention, get_attention_backend

    q, k, v, positions, k_cache, v_cache, meta = _decode_step(4, 2, 32, torch.float32, seed=5)
    q, k, v, positions = q.cpu(), k.cpu(), v.cpu(), positions.cpu()
    rope = RotaryEmbedding(32, 64, base=10000.0)
    attn = Attention(4, 2, 32, 32**-0.5, get_attention_backend("triton"))
    attn.k_cache, attn.v_cache = k_cache.cpu().clone(), v_cache.cpu().clone()
    rq, rk = rope(positions, q, k, kv_write=attn.kv_write(v, meta))
    assert rk is not None
    assert torch.equal(attn.k_cache, k_cache.cpu()) and torch.equal(attn.v_cache, v_cache.cpu())
    torch.testing.assert_close((rq, rk), rope(positions, q, k), atol=0, rtol=0)
    torch_attn = Attention(4, 2, 32, 32**-0.5, get_attention_backend("torch"))
    assert torch_attn.kv_write(v, meta) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 1500])
@pytest.mark.parametrize("num_tokens", [1, 9])
def test_silu_and_mul(num_tokens: int, d: int, dtype: torch.dtype) -> None:
    from minivllm.kernels.activation import silu_and_mul

    gen = _gen(num_tokens + d)
    x = (4 * torch.randn(num_tokens, 2 * d, generator=gen)).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    expect = F.silu(gate) * up
    got = silu_and_mul(x.to(DEVICE), out=poison_like(expect).to(DEVICE))
    torch.testing.assert_close(got.cpu(), expect, **_tol(dtype))
