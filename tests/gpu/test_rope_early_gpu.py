"""The rotary kernel (kernels/qk_norm_rope.py) on the GPU, bf16, Qwen3-0.6B's heads, replayed
from a CUDA graph right after the PDL GEMM that writes qkv, with the hidden states, positions and
slots changed between replays (copied in before each replay, as the engine uploads them):
- its early loads (`early_loads`: each token's position, slot and cos / sin rows read before the
  PDL wait): each replay writes exactly what the kernel without early loads writes;
- qkv as split-K partial sums (`num_parts`): each replay writes exactly what the kernel writes
  for the partials' sum in split order, rounded to bf16."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 1024, 16, 8, 128, 16, 64
Q_SIZE, KV_SIZE = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
BF16 = torch.bfloat16


class _Layer:
    """One layer's qkv weight, rotary tables and q/k norm weights, and the step's input buffers
    (hidden states, positions, slots) that `new_inputs` refills between graph replays."""

    def __init__(self, rows: int, seed: int):
        self.rows = rows
        self.gen = torch.Generator(device="cuda").manual_seed(seed)
        gen = self.gen
        self.weight = (
            0.03 * torch.randn(Q_SIZE + 2 * KV_SIZE, HIDDEN, generator=gen, device="cuda")
        ).to(BF16)
        angles = torch.rand(4096, HEAD_DIM // 2, generator=gen, device="cuda") * 6.3
        self.cos = torch.cat([angles.cos()] * 2, dim=-1).to(BF16)
        self.sin = torch.cat([angles.sin()] * 2, dim=-1).to(BF16)
        self.norm_w = (torch.rand(2, HEAD_DIM, generator=gen, device="cuda") + 0.5).to(BF16)
        self.src = torch.empty(rows, HIDDEN, dtype=BF16, device="cuda")
        self.positions = torch.empty(rows, dtype=torch.int64, device="cuda")
        self.slots = torch.empty(rows, dtype=torch.int64, device="cuda")

    def caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        return tuple(torch.zeros(shape, dtype=BF16, device="cuda") for _ in range(2))

    def new_inputs(self, seed: int, padding_row: bool = False) -> None:
        g, rows = self.gen.manual_seed(1000 + seed), self.rows
        self.src.copy_(torch.randn(rows, HIDDEN, generator=g, device="cuda"))
        self.positions.copy_(torch.randint(0, 4096, (rows,), generator=g, device="cuda"))
        slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g, device="cuda")[:rows]
        self.slots.copy_(slots)
        if padding_row:
            self.slots[-1] = -1

    def rope(self, qkv: torch.Tensor, caches, early: bool = True, **parts) -> torch.Tensor:
        from minivllm.kernels.qk_norm_rope import qk_norm_rope_store_kv

        rows = self.rows
        q, k, v = qkv.split([Q_SIZE, KV_SIZE, KV_SIZE], dim=-1)
        return qk_norm_rope_store_kv(
            q.view(rows, HEADS, HEAD_DIM), k.view(rows, KV_HEADS, HEAD_DIM),
            v.view(rows, KV_HEADS, HEAD_DIM), self.positions, self.cos, self.sin, *caches,
            self.slots, self.norm_w[0], self.norm_w[1], early_loads=early, **parts,
        )  # fmt: skip

    def replays(self, step, caches, padding_row: bool = False):
        """Captures step(caches) in a CUDA graph, then for three new inputs replays it (caches
        zeroed first) and yields the captured outputs."""
        self.new_inputs(0, padding_row)
        step(caches)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(caches)
        for seed in range(1, 4):
            for cache in caches:
                cache.zero_()
            self.new_inputs(seed, padding_row)
            graph.replay()
            yield out


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_rope_early_loads_after_a_pdl_writer_in_a_graph_bf16(rows: int):
    from minivllm.kernels.linear import linear

    layer = _Layer(rows, seed=rows)
    caches = layer.caches()

    def step(caches, early: bool = True) -> torch.Tensor:
        # linear: a PDL kernel writing what the rotary kernel reads
        return layer.rope(linear(layer.src, layer.weight), caches, early)

    for out in layer.replays(step, caches):
        expect_caches = layer.caches()
        expect = step(expect_caches, early=False)
        assert torch.equal(out, expect)
        for got, want in zip(caches, expect_caches, strict=True):
            assert torch.equal(got, want)
        assert caches[0].view(-1, KV_SIZE)[layer.slots].abs().sum() > 0  # this replay's slots


@pytest.mark.parametrize("rows,splits", [(1, 2), (16, 4), (64, 2)])
def test_rope_adds_up_qkv_partials_in_a_graph_bf16(rows: int, splits: int):
    """layers.linear.QKV_SPLITS's route; the padding row (slot -1) writes nothing."""
    from minivllm.kernels.linear import linear

    layer = _Layer(rows, seed=rows * 10 + splits)
    caches = layer.caches()

    def step(caches) -> tuple[torch.Tensor, torch.Tensor]:
        parts = linear(layer.src, layer.weight, partials=True, splits=splits)
        split = {"num_parts": parts.shape[0], "split_stride": parts.stride(0)}
        return layer.rope(parts[0], caches, **split), parts

    for out, parts in layer.replays(step, caches, padding_row=True):
        assert parts.shape[0] == splits
        total = parts[0].clone()
        for s in range(1, splits):
            total += parts[s]
        expect_caches = layer.caches()
        expect = layer.rope(total.to(BF16), expect_caches)
        assert torch.equal(out, expect)
        for got, want in zip(caches, expect_caches, strict=True):
            assert torch.equal(got, want)
        if rows > 1:
            assert caches[0].view(-1, KV_SIZE)[layer.slots[:-1]].abs().sum() > 0
        product = layer.src.float() @ layer.weight.float().T  # and the partials are the product
        torch.testing.assert_close(total, product, atol=2e-2, rtol=2e-2)
