"""The rotary kernel's early loads (kernels/qk_norm_rope.py `early_loads`: each token's position,
slot and cos / sin rows read before the PDL wait) on the GPU, bf16, Qwen3-0.6B's heads: replayed
from a CUDA graph right after the PDL GEMM that writes qkv, with the hidden states, positions and
slots changed between replays (copied in before each replay, as the engine uploads them), each
replay writes exactly what the kernel without early loads writes for that replay's inputs."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 1024, 16, 8, 128, 16, 64


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_rope_early_loads_after_a_pdl_writer_in_a_graph_bf16(rows: int):
    from minivllm.kernels.linear import linear
    from minivllm.kernels.qk_norm_rope import qk_norm_rope_store_kv

    gen = torch.Generator(device="cuda").manual_seed(rows)
    bf16 = torch.bfloat16
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    weight = (0.03 * torch.randn(q_size + 2 * kv_size, HIDDEN, generator=gen, device="cuda")).to(
        bf16
    )
    angles = torch.rand(4096, HEAD_DIM // 2, generator=gen, device="cuda") * 6.3
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(bf16)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(bf16)
    norm_w = (torch.rand(2, HEAD_DIM, generator=gen, device="cuda") + 0.5).to(bf16)
    src = torch.empty(rows, HIDDEN, dtype=bf16, device="cuda")
    positions = torch.empty(rows, dtype=torch.int64, device="cuda")
    slots = torch.empty(rows, dtype=torch.int64, device="cuda")
    shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)

    def step(early: bool, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        qkv = linear(src, weight)  # a PDL kernel writing what the rotary kernel reads
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return qk_norm_rope_store_kv(
            q.view(rows, HEADS, HEAD_DIM), k.view(rows, KV_HEADS, HEAD_DIM),
            v.view(rows, KV_HEADS, HEAD_DIM), positions, cos, sin, k_cache, v_cache, slots,
            norm_w[0], norm_w[1], early_loads=early,
        )  # fmt: skip

    def new_inputs(seed: int) -> None:
        g = gen.manual_seed(1000 + seed)
        src.copy_(torch.randn(rows, HIDDEN, generator=g, device="cuda"))
        positions.copy_(torch.randint(0, 4096, (rows,), generator=g, device="cuda"))
        slots.copy_(torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g, device="cuda")[:rows])

    k_cache, v_cache = (
        torch.zeros(shape, dtype=bf16, device="cuda"),
        torch.zeros(shape, dtype=bf16, device="cuda"),
    )
    new_inputs(0)
    step(True, k_cache, v_cache)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(True, k_cache, v_cache)
    for seed in range(1, 4):
        k_cache.zero_()
        v_cache.zero_()
        new_inputs(seed)
        graph.replay()
        k_expect, v_expect = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
        expect = step(False, k_expect, v_expect)
        assert torch.equal(out, expect)
        assert torch.equal(k_cache, k_expect) and torch.equal(v_cache, v_expect)
        assert k_cache.view(-1, kv_size)[slots].abs().sum() > 0  # this replay's slots written


@pytest.mark.parametrize("rows,splits", [(1, 2), (16, 4), (64, 2)])
def test_rope_adds_up_qkv_partials_in_a_graph_bf16(rows: int, splits: int):
    """The qkv GEMM as split-K partial sums (layers.linear.QKV_SPLITS) straight into the rotary
    kernel, replayed from a CUDA graph with new inputs each time: q, the caches and the padding
    row's slot (-1: nothing written) exactly as the kernel gives for the partials' sum in split
    order rounded to bf16."""
    from minivllm.kernels.linear import linear
    from minivllm.kernels.qk_norm_rope import qk_norm_rope_store_kv

    gen = torch.Generator(device="cuda").manual_seed(rows * 10 + splits)
    bf16 = torch.bfloat16
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    n = q_size + 2 * kv_size
    weight = (0.03 * torch.randn(n, HIDDEN, generator=gen, device="cuda")).to(bf16)
    angles = torch.rand(4096, HEAD_DIM // 2, generator=gen, device="cuda") * 6.3
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(bf16)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(bf16)
    norm_w = (torch.rand(2, HEAD_DIM, generator=gen, device="cuda") + 0.5).to(bf16)
    src = torch.empty(rows, HIDDEN, dtype=bf16, device="cuda")
    positions = torch.empty(rows, dtype=torch.int64, device="cuda")
    slots = torch.empty(rows, dtype=torch.int64, device="cuda")
    shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)

    def rope(qkv: torch.Tensor, caches, **parts) -> torch.Tensor:
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return qk_norm_rope_store_kv(
            q.view(rows, HEADS, HEAD_DIM), k.view(rows, KV_HEADS, HEAD_DIM),
            v.view(rows, KV_HEADS, HEAD_DIM), positions, cos, sin, *caches, slots,
            norm_w[0], norm_w[1], early_loads=True, **parts,
        )  # fmt: skip

    def step(caches) -> tuple[torch.Tensor, torch.Tensor]:
        parts = linear(src, weight, partials=True, splits=splits)
        out = rope(parts[0], caches, num_parts=parts.shape[0], split_stride=parts.stride(0))
        return out, parts

    def new_inputs(seed: int) -> None:
        g = gen.manual_seed(1000 + seed)
        src.copy_(torch.randn(rows, HIDDEN, generator=g, device="cuda"))
        positions.copy_(torch.randint(0, 4096, (rows,), generator=g, device="cuda"))
        slots.copy_(torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g, device="cuda")[:rows])
        slots[-1] = -1  # a padding row

    caches = tuple(torch.zeros(shape, dtype=bf16, device="cuda") for _ in range(2))
    new_inputs(0)
    step(caches)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, parts = step(caches)
    assert parts.shape[0] == splits
    for seed in range(1, 4):
        for cache in caches:
            cache.zero_()
        new_inputs(seed)
        graph.replay()
        total = parts[0].clone()
        for s in range(1, splits):
            total += parts[s]
        expect_caches = tuple(torch.zeros_like(cache) for cache in caches)
        expect = rope(total.to(bf16), expect_caches)
        assert torch.equal(out, expect)
        for got, want in zip(caches, expect_caches, strict=True):
            assert torch.equal(got, want)
        if rows > 1:
            assert caches[0].view(-1, kv_size)[slots[:-1]].abs().sum() > 0
        torch.testing.assert_close(  # and the partials are the product
            total, src.float() @ weight.float().T, atol=2e-2, rtol=2e-2
        )
