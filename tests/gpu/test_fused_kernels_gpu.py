"""Fused elementwise kernels and the decode-size GEMMs on the GPU at Qwen3-0.6B sizes (hidden
1024, 16 query heads, 8 KV heads, head_dim 128, intermediate 3072, vocab 151936, 256 rows) in
bf16, against the torch code of the layers they replace (or, for the q/k-norm + rotary kernel that
also writes the KV cache, against the two kernels it replaces), and captured into a CUDA graph and
replayed with the sampler. The sampler alone: test_sampling_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from minivllm.layers.rmsnorm import RMSNorm
from minivllm.layers.rotary import RotaryEmbedding, _apply

pytestmark = pytest.mark.gpu

T, HIDDEN, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, INTER, VOCAB = 256, 1024, 16, 8, 128, 3072, 151936
DT = torch.bfloat16
# The kernels repeat torch's roundings; rsqrt / exp may still differ in the last bit before a
# bf16 rounding, i.e. one bf16 ulp (2^-8 relative) on a few elements.
TOL = {"atol": 1e-2, "rtol": 1e-2}


def _close_and_mostly_equal(got: torch.Tensor, expect: torch.Tensor) -> None:
    torch.testing.assert_close(got, expect, **TOL)
    assert (got == expect).float().mean().item() > 0.99


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _norm(hidden: int, seed: int) -> RMSNorm:
    with torch.device("cuda"):  # built on CUDA: the fused kernels
        norm = RMSNorm(hidden, eps=1e-6).to(dtype=DT)
    norm.weight.copy_(torch.rand(hidden, generator=_gen(seed), device="cuda") + 0.5)
    return norm


def test_rmsnorm_bf16() -> None:
    from minivllm.kernels.fused_norm import fused_add_rmsnorm, rmsnorm

    norm = _norm(HIDDEN, 0)
    x = (3 * torch.randn(T, HIDDEN, generator=_gen(1), device="cuda")).to(DT)
    residual = torch.randn(T, HIDDEN, generator=_gen(2), device="cuda").to(DT)
    _close_and_mostly_equal(rmsnorm(x, norm.weight, norm.eps), norm._norm(x))
    out, new_residual = fused_add_rmsnorm(x, residual, norm.weight, norm.eps)
    assert torch.equal(new_residual, x + residual)
    _close_and_mostly_equal(out, norm._norm(x + residual))
    # The layer routes CUDA tensors to the kernel.
    layer_out, layer_residual = norm(x, residual)
    assert torch.equal(layer_out, out) and torch.equal(layer_residual, new_residual)


def _qkv() -> torch.Tensor:
    size = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    return (2 * torch.randn(T, size, generator=_gen(3), device="cuda")).to(DT)


def _split(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q_size, kv_size = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return q.view(T, NUM_HEADS, HEAD_DIM), k.view(T, NUM_KV_HEADS, HEAD_DIM)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("rows", [1, 8, 64, 128, 129, 256, 257])
@pytest.mark.parametrize("k", [2048, INTER])  # o_proj and down_proj of Qwen3-0.6B
def test_row_parallel_split_k_into_rmsnorm_bf16(rows: int, k: int) -> None:
    """o_proj / down_proj at decode sizes leave split-K partial sums that the next add + RMSNorm
    adds up; against cuBLAS + the same norm: the projection agrees to a bf16 rounding of the sum
    (a different float32 summation order), the norm then as usual."""
    from minivllm.layers.linear import RowParallelLinear, SplitKPartials

    with torch.device("cuda"):
        proj = RowParallelLinear(k, HIDDEN).to(dtype=DT)
    proj.weight.copy_(0.02 * torch.randn(HIDDEN, k, generator=_gen(5), device="cuda"))
    x = torch.randn(rows, k, generator=_gen(6), device="cuda").to(DT)
    residual = torch.randn(rows, HIDDEN, generator=_gen(7), device="cuda").to(DT)
    norm = _norm(HIDDEN, 8)
    y = proj(x, partials=True)
    expect_y = F.linear(x, proj.weight)
    if rows > 256:  # prefill sizes: cuBLAS
        assert isinstance(y, torch.Tensor) and torch.equal(y, expect_y)
        return
    assert isinstance(y, SplitKPartials) and y.parts.dtype == torch.float32
    _close_and_mostly_equal(y.materialize(), expect_y)
    out, new_residual = norm(y, residual)
    expect_out, expect_residual = norm(y.materialize(), residual)
    assert torch.equal(new_residual, expect_residual)
    _close_and_mostly_equal(out, expect_out)
    plain = proj(x)  # without partials=True: a plain tensor
    assert isinstance(plain, torch.Tensor) and plain.dtype == DT
    _close_and_mostly_equal(plain, expect_y)


@pytest.mark.parametrize("rows", [1, 16, 100, 128, 129, 256])
@pytest.mark.parametrize("n", [4096, 6144])  # qkv_proj and gate_up_proj of Qwen3-0.6B
def test_column_parallel_triton_gemm_bf16(rows: int, n: int) -> None:
    """Up to 128 tokens the column-parallel projections run the Triton GEMM: against cuBLAS it
    agrees to a bf16 rounding (a different float32 summation order); past 128, cuBLAS itself."""
    from minivllm.layers.linear import ColumnParallelLinear

    with torch.device("cuda"):
        proj = ColumnParallelLinear(HIDDEN, n).to(dtype=DT)
    proj.weight.copy_(0.02 * torch.randn(n, HIDDEN, generator=_gen(9), device="cuda"))
    x = torch.randn(rows, HIDDEN, generator=_gen(10), device="cuda").to(DT)
    y, expect = proj(x), F.linear(x, proj.weight)
    assert y.shape == expect.shape and y.dtype == DT
    if rows > 128:
        assert torch.equal(y, expect)
    else:
        _close_and_mostly_equal(y, expect)


@pytest.mark.parametrize("with_norm", [True, False])
def test_qk_norm_rope_bf16(with_norm: bool) -> None:
    """Against a float32 oracle on the same bf16 inputs: the kernel rounds once where the torch
    path rounds after every op (and the compiler may contract a*b+c into an FMA), so the two
    bf16 results differ by an ulp here and there; the kernel must be at least as accurate."""
    rope = RotaryEmbedding(HEAD_DIM, 40960, 1_000_000.0, fused=True).to(device="cuda", dtype=DT)
    q_norm, k_norm = (_norm(HEAD_DIM, 4), _norm(HEAD_DIM, 5)) if with_norm else (None, None)
    q, k = _split(_qkv())
    positions = torch.randint(0, 40960, (T,), generator=_gen(6), device="cuda", dtype=torch.int32)
    got_q, got_k = rope(positions, q, k, q_norm, k_norm)  # the layer's CUDA path: the kernel
    cos = rope.cos_cache[positions].unsqueeze(1)
    sin = rope.sin_cache[positions].unsqueeze(1)
    for got, x, norm in ((got_q, q, q_norm), (got_k, k, k_norm)):
        torch_path = _apply(norm._norm(x) if norm is not None else x, cos, sin)
        x32 = x.float()
        if norm is not None:
            x32 = norm.weight.float() * (
                x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)
            )
        ref = _apply(x32, cos.float(), sin.float())
        torch.testing.assert_close(got.float(), torch_path.float(), atol=3e-2, rtol=2e-2)
        kernel_err, torch_err = _rel_err(got, ref), _rel_err(torch_path, ref)
        assert kernel_err < 1e-2, kernel_err
        assert kernel_err <= 1.25 * torch_err + 1e-4, (kernel_err, torch_err)
    # Without a kv_write (torch backend), the layer returns k itself.
    assert got_k is not None


def _value(qkv: torch.Tensor) -> torch.Tensor:  # [T, NUM_KV_HEADS, HEAD_DIM], a view
    return qkv[:, (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM :].view(T, NUM_KV_HEADS, HEAD_DIM)


def _kv_cache_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random old cache contents (64 blocks of 16) and shuffled int32 slots, every 9th -1."""
    g = _gen(seed)
    shape = (64, 16, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=g, device="cuda").to(DT)
    v_cache = torch.randn(shape, generator=g, device="cuda").to(DT)
    slots = torch.randperm(64 * 16, generator=g, device="cuda")[:T].to(torch.int32)
    slots[::9] = -1
    return k_cache, v_cache, slots


@pytest.mark.parametrize("with_norm", [True, False])
def test_qk_norm_rope_store_kv_bf16(with_norm: bool) -> None:
    """The rotary layer handed a KVCacheWrite (the triton backend's route) writes exactly what
    qk_norm_rope followed by store_kvcache write: slot -1 nowhere, every other slot untouched."""
    from minivllm.kernels.kv_store import store_kvcache
    from minivllm.kernels.qk_norm_rope import qk_norm_rope
    from minivllm.layers.attention import KVCacheWrite

    rope = RotaryEmbedding(HEAD_DIM, 40960, 1_000_000.0, fused=True).to(device="cuda", dtype=DT)
    q_norm, k_norm = (_norm(HEAD_DIM, 4), _norm(HEAD_DIM, 5)) if with_norm else (None, None)
    qkv = _qkv()
    q, k = _split(qkv)
    v = _value(qkv)
    k_old, v_old, slots = _kv_cache_case(15)
    positions = torch.randint(0, 40960, (T,), generator=_gen(6), device="cuda", dtype=torch.int32)
    weights = (q_norm.weight, k_norm.weight, q_norm.eps, k_norm.eps) if with_norm else ()
    expect_q, rope_k = qk_norm_rope(q, k, positions, rope.cos_cache, rope.sin_cache, *weights)
    k_expect, v_expect = k_old.clone(), v_old.clone()
    store_kvcache(rope_k, v, k_expect, v_expect, slots)
    k_cache, v_cache = k_old.clone(), v_old.clone()
    kv_write = KVCacheWrite(v, k_cache, v_cache, slots)
    got_q, got_k = rope(positions, q, k, q_norm, k_norm, kv_write=kv_write)
    assert got_k is None
    assert torch.equal(got_q, expect_q)
    assert torch.equal(k_cache, k_expect) and torch.equal(v_cache, v_expect)
    assert not torch.equal(k_cache, k_old)


@pytest.mark.parametrize("rows", [1, 7, 16, 17, 64])
def test_gate_up_with_silu_in_the_epilogue_bf16(rows: int) -> None:
    """Up to GATED_MAX_TOKENS tokens gate_up_proj's GEMM ends in SiLU-and-multiply: the same
    values as the plain Triton GEMM followed by the activation kernel; past it, None (the caller
    runs both)."""
    from minivllm.kernels.activation import silu_and_mul
    from minivllm.layers.linear import GATED_MAX_TOKENS, MergedColumnParallelLinear

    with torch.device("cuda"):
        proj = MergedColumnParallelLinear(HIDDEN, [INTER, INTER]).to(dtype=DT)
    proj.weight.copy_(0.05 * torch.randn(2 * INTER, HIDDEN, generator=_gen(11), device="cuda"))
    x = torch.randn(rows, HIDDEN, generator=_gen(12), device="cuda").to(DT)
    got = proj.silu_and_mul(x)
    if rows > GATED_MAX_TOKENS:
        assert got is None
        return
    separate = silu_and_mul(proj(x))
    assert got.shape == (rows, INTER) and got.dtype == DT
    _close_and_mostly_equal(got, separate)
    gate, up = F.linear(x, proj.weight).chunk(2, dim=-1)  # cuBLAS and torch's activation
    torch.testing.assert_close(got, F.silu(gate) * up, atol=2e-2, rtol=2e-2)


def test_silu_and_mul_bf16() -> None:
    from minivllm.kernels.activation import silu_and_mul

    x = (4 * torch.randn(T, 2 * INTER, generator=_gen(7), device="cuda")).to(DT)
    gate, up = x.chunk(2, dim=-1)
    _close_and_mostly_equal(silu_and_mul(x), F.silu(gate) * up)


def test_graph_capture_and_replay() -> None:
    """The decode-step kernels inside one CUDA graph: replays on new inputs equal eager calls."""
    from minivllm.kernels.activation import silu_and_mul
    from minivllm.kernels.fused_norm import fused_add_rmsnorm
    from minivllm.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_store_kv
    from minivllm.kernels.sampling import sample_from_logits

    norm, q_norm, k_norm = _norm(HIDDEN, 12), _norm(HEAD_DIM, 13), _norm(HEAD_DIM, 14)
    rope = RotaryEmbedding(HEAD_DIM, 40960, 1_000_000.0, fused=True).to(device="cuda", dtype=DT)
    x = torch.empty(T, HIDDEN, device="cuda", dtype=DT)
    residual = torch.empty_like(x)
    qkv = torch.empty_like(_qkv())
    positions = torch.empty(T, device="cuda", dtype=torch.int32)
    gate_up = torch.empty(T, 2 * INTER, device="cuda", dtype=DT)
    logits = torch.empty(T, VOCAB, device="cuda", dtype=DT)
    temperature = torch.empty(T, device="cuda")
    u = torch.empty(T, device="cuda")
    k_cache, v_cache, slots = _kv_cache_case(15)

    def fill(seed: int) -> None:
        g = _gen(seed)
        x.copy_(torch.randn(x.shape, generator=g, device="cuda"))
        residual.copy_(torch.randn(x.shape, generator=g, device="cuda"))
        qkv.copy_(torch.randn(qkv.shape, generator=g, device="cuda"))
        positions.copy_(torch.randint(0, 40960, (T,), generator=g, device="cuda"))
        gate_up.copy_(torch.randn(gate_up.shape, generator=g, device="cuda"))
        logits.copy_(3 * torch.randn(logits.shape, generator=g, device="cuda"))
        temperature.copy_(torch.rand(T, generator=g, device="cuda") + 0.1)
        temperature[::4] = 0.0
        u.copy_(torch.rand(T, generator=g, device="cuda"))
        slots.copy_(torch.randperm(slots.shape[0], generator=g, device="cuda"))
        slots[::7] = -1
        k_cache.zero_()
        v_cache.zero_()

    def step() -> list[torch.Tensor]:
        h, r = fused_add_rmsnorm(x, residual, norm.weight, norm.eps)
        q, k = _split(qkv)
        q, k = qk_norm_rope(
            q,
            k,
            positions,
            rope.cos_cache,
            rope.sin_cache,
            q_norm.weight,
            k_norm.weight,
            q_norm.eps,
            k_norm.eps,
        )
        q_cached = qk_norm_rope_store_kv(
            *_split(qkv),
            _value(qkv),
            positions,
            rope.cos_cache,
            rope.sin_cache,
            k_cache,
            v_cache,
            slots,
            q_norm.weight,
            k_norm.weight,
            q_norm.eps,
            k_norm.eps,
        )
        out = [h, r, q, k, q_cached, silu_and_mul(gate_up)]
        return [*out, sample_from_logits(logits, temperature, u)]

    fill(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for seed in (1, 2):
        fill(seed)
        graph.replay()
        torch.cuda.synchronize()
        replayed_caches = [k_cache.clone(), v_cache.clone()]
        assert replayed_caches[0].any()
        k_cache.zero_()
        v_cache.zero_()
        for got, expect in zip(static_out, step()):
            assert torch.equal(got, expect)
        assert torch.equal(replayed_caches[0], k_cache) and torch.equal(replayed_caches[1], v_cache)
