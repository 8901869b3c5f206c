"""Split-K GEMM partial sums (kernels/linear.py) and the add + RMSNorm that consumes them
(kernels/fused_norm.py), against plain torch (interpreter on the CPU; bf16 in tests/gpu)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE
from minivllm.layers.linear import SplitKPartials
from minivllm.layers.rmsnorm import RMSNorm


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("m", "n", "k", "config"),
    [
        (1, 64, 1024, None),  # the default configuration: 8 splits
        (7, 128, 512, (8, 16, 64, 64, 4, 3)),
        (33, 64, 2048, (4, 64, 64, 64, 4, 4)),  # M not a multiple of BM: masked rows
        (100, 128, 256, (2, 64, 64, 64, 4, 3)),
    ],
)
def test_splitk_partials_match_the_product(m, n, k, config, dtype) -> None:
    from minivllm.kernels.linear import splitk_config, splitk_partials

    gen = _gen(m * n + k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    parts = splitk_partials(x.to(DEVICE), w.to(DEVICE), config)
    assert parts is not None and parts.dtype == torch.float32
    splits = (config or splitk_config(m, n, k))[0]
    assert parts.shape == (splits, m, n)
    # Each part is the product over its own slice of K.
    xs, ws = x.float().chunk(splits, dim=1), w.float().chunk(splits, dim=1)
    for s in range(splits):
        torch.testing.assert_close(parts[s].cpu(), xs[s] @ ws[s].T, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(parts.sum(0).cpu(), x.float() @ w.float().T, atol=2e-3, rtol=1e-4)


def test_splitk_config_declines_what_it_does_not_fit() -> None:
    from minivllm.kernels.linear import MAX_SPLIT_K_TOKENS, splitk_config, splitk_partials

    assert splitk_config(MAX_SPLIT_K_TOKENS, 1024, 3072) is not None
    assert splitk_config(MAX_SPLIT_K_TOKENS + 1, 1024, 3072) is None  # cuBLAS fills the GPU
    assert splitk_config(0, 1024, 3072) is None
    assert splitk_config(8, 1000, 3072) is None  # N not a multiple of the tile
    assert splitk_config(8, 1024, 96) is None  # K too short to split
    assert splitk_config(8, 1024, 256)[0] == 4  # fewer splits when K is short
    x, w = torch.randn(300, 1024), torch.randn(1024, 1024)
    assert splitk_partials(x.to(DEVICE), w.to(DEVICE)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_parts", [2, 8])
def test_fused_add_rmsnorm_adds_partials_in_split_order(num_parts: int, dtype) -> None:
    """The kernel's input is the partials' float32 sum (split order) rounded to the residual's
    dtype: the same as a GEMM that wrote that sum, then the add + norm as before."""
    from minivllm.kernels.fused_norm import fused_add_rmsnorm

    gen = _gen(num_parts)
    rows, hidden = 13, 96
    norm = RMSNorm(hidden, eps=1e-6).to(dtype)
    norm.weight.copy_(torch.rand(hidden, generator=gen) + 0.5)
    parts = torch.randn(num_parts, rows, hidden, generator=gen)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype)
    total = parts[0].clone()
    for s in range(1, num_parts):
        total += parts[s]
    expect, expect_residual = norm(total.to(dtype), residual)
    got, got_residual = fused_add_rmsnorm(
        parts.to(DEVICE), residual.to(DEVICE), norm.weight.to(DEVICE), norm.eps
    )
    assert got_residual.dtype == dtype and got.dtype == dtype
    torch.testing.assert_close(got_residual.cpu(), expect_residual, atol=0, rtol=0)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.cpu(), expect, atol=tol, rtol=tol)


def test_rmsnorm_layer_takes_partials_on_the_torch_path() -> None:
    """RMSNorm given SplitKPartials off the fused path adds them up first (same result as the
    tensor they stand for)."""
    gen = _gen(3)
    norm = RMSNorm(32, eps=1e-6)
    norm.weight.copy_(torch.rand(32, generator=gen))
    parts = torch.randn(4, 5, 32, generator=gen)
    residual = torch.randn(5, 32, generator=gen).half()
    got, got_residual = norm(SplitKPartials(parts, torch.float16), residual)
    expect, expect_residual = norm(parts.sum(0).half(), residual)
    torch.testing.assert_close(got_residual, expect_residual, atol=0, rtol=0)
    torch.testing.assert_close(got, expect, atol=0, rtol=0)
    with pytest.raises(AssertionError, match="residual"):
        norm(SplitKPartials(parts, torch.float16))
