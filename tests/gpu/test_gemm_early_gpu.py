"""The Triton GEMM's early weight columns (kernels/linear.py `early`: read before the PDL wait) on
the GPU, bf16, at Qwen3-0.6B's four projections: replayed from a CUDA graph right after the PDL
kernel that writes x (an RMSNorm), with x changed between replays, each replay gives the product
of that replay's x, as the GEMM without early columns computes it (to float32 summation order)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

HIDDEN, ATTN, INTER = 1024, 2048, 3072


@pytest.mark.parametrize("rows", [1, 16, 100, 128])
@pytest.mark.parametrize(
    ("n", "k", "kind"),
    [(4096, HIDDEN, "plain"), (HIDDEN, ATTN, "partials"), (INTER, HIDDEN, "gated"),
     (HIDDEN, INTER, "partials")],
)  # fmt: skip
def test_early_columns_after_a_pdl_writer_in_a_graph_bf16(rows: int, n: int, k: int, kind: str):
    from minivllm.kernels.fused_norm import rmsnorm
    from minivllm.kernels.linear import linear

    gen = torch.Generator(device="cuda").manual_seed(rows + n + k)
    weight = 0.02 * torch.randn(2 * n if kind == "gated" else n, k, generator=gen, device="cuda")
    weight = weight.to(torch.bfloat16)
    norm_weight = torch.ones(k, dtype=torch.bfloat16, device="cuda")
    src = torch.randn(rows, k, generator=gen, device="cuda").to(torch.bfloat16)
    options = {"partials": kind == "partials", "gated": kind == "gated"}

    def step(early: int) -> torch.Tensor:
        y = linear(rmsnorm(src, norm_weight, 1e-6), weight, early=early, **options)
        return y.float().sum(0) if kind == "partials" else y.float()

    step(256)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(256)
    for seed in range(3):
        src.copy_(torch.randn(rows, k, generator=gen.manual_seed(seed), device="cuda"))
        graph.replay()
        expect = step(0)
        torch.testing.assert_close(out, expect, atol=2e-2, rtol=2e-2)
        assert (out - expect).abs().max().item() < 0.05 * expect.abs().max().item()
