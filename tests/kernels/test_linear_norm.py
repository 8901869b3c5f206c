"""The split-K GEMM with the residual add + RMSNorm folded in (kernels/linear_norm.py) against
the two kernels it replaces and plain torch (interpreter on the CPU in float16; bf16 and CUDA
graphs in tests/gpu), and the layers that hand it over (the "splitk_norm" experiment)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE
from minivllm.layers.linear import DeferredLinear, RowParallelLinear, SplitKPartials
from minivllm.layers.rmsnorm import RMSNorm

EPS = 1e-6


def _operands(m: int, n: int, k: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1000 * m + n + k)
    x = torch.randn(m, k, generator=gen).half()
    w = (torch.randn(n, k, generator=gen) * 0.05).half()
    residual = torch.randn(m, n, generator=gen).half()
    norm_weight = (torch.rand(n, generator=gen) + 0.5).half()
    return [t.to(DEVICE) for t in (x, w, residual, norm_weight)]


def _counters_are_zero() -> bool:
    from minivllm.kernels.linear_norm import _counters

    device = torch.device(DEVICE) if DEVICE == "cpu" else torch.device("cuda", 0)
    return bool((_counters(device) == 0).all())


@pytest.mark.parametrize(
    ("m", "n", "k", "config"),
    [
        (1, 64, 1024, None),  # the default configuration: 8 splits, one output tile
        (7, 96, 320, (2, 16, 64, 64, 4, 2)),  # N not a multiple of BN; a short last split
        (33, 160, 320, (4, 16, 64, 64, 4, 2)),  # 3 row blocks; one split with no K left at all
        (33, 96, 192, (3, 64, 64, 64, 4, 2, False)),  # token rows on the MMA's M side
        (20, 1100, 128, (2, 64, 64, 64, 4, 2)),  # 18 tiles a row; the norm in 5 steps, 1 short
    ],
)
def test_linear_add_rmsnorm_matches_the_two_kernels(m, n, k, config) -> None:
    from minivllm.kernels.fused_norm import fused_add_rmsnorm
    from minivllm.kernels.linear import linear
    from minivllm.kernels.linear_norm import linear_add_rmsnorm

    x, w, residual, norm_weight = _operands(m, n, k)
    residual_before = residual.clone()
    out, new_residual = linear_add_rmsnorm(x, w, residual, norm_weight, EPS, config=config)
    parts = linear(x, w, partials=True, config=config)
    expect, expect_residual = fused_add_rmsnorm(parts, residual, norm_weight, EPS)
    assert out.dtype == new_residual.dtype == torch.float16
    assert torch.equal(residual, residual_before)  # the residual is read, never written
    # The same partial sums added in the same order: the same new residual, bit for bit; the
    # sum of squares adds per-tile sums, so the norm may differ in a last bit.
    assert torch.equal(new_residual, expect_residual)
    torch.testing.assert_close(out, expect, atol=2e-3, rtol=2e-3)
    # Against plain torch: the product rounded once, then the layer's torch path.
    y = (x.float() @ w.float().T).half()
    norm = RMSNorm(n, eps=EPS).half()
    norm.weight.copy_(norm_weight.cpu())
    torch_out, torch_residual = norm(y.cpu(), residual.cpu())
    torch.testing.assert_close(new_residual.cpu(), torch_residual, atol=4e-3, rtol=2e-3)
    torch.testing.assert_close(out.cpu(), torch_out, atol=1e-2, rtol=1e-2)
    # Every counter is back at zero: a second call (a graph replay) computes the same.
    assert _counters_are_zero()
    again, again_residual = linear_add_rmsnorm(x, w, residual, norm_weight, EPS, config=config)
    assert torch.equal(again, out) and torch.equal(again_residual, new_residual)


def test_norm_weight_of_another_dtype_promotes_the_output() -> None:
    """A float32 norm weight over float16 activations: the output is float32 (weight * norm in
    the promoted dtype, as torch and fused_add_rmsnorm have it); the residual stays float16."""
    from minivllm.kernels.fused_norm import fused_add_rmsnorm
    from minivllm.kernels.linear import linear
    from minivllm.kernels.linear_norm import linear_add_rmsnorm

    x, w, residual, norm_weight = _operands(5, 64, 256)
    norm_weight = norm_weight.float()
    config = (2, 16, 64, 64, 4, 2)
    out, new_residual = linear_add_rmsnorm(x, w, residual, norm_weight, EPS, config=config)
    parts = linear(x, w, partials=True, config=config)
    expect, expect_residual = fused_add_rmsnorm(parts, residual, norm_weight, EPS)
    assert out.dtype == torch.float32 and new_residual.dtype == torch.float16
    assert torch.equal(new_residual, expect_residual)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_supports_only_decode_sizes() -> None:
    from minivllm.kernels.linear_norm import MAX_TOKENS, supports

    w = torch.zeros(64, 128, dtype=torch.float16)
    assert supports(torch.zeros(MAX_TOKENS, 128, dtype=torch.float16), w)
    assert not supports(torch.zeros(MAX_TOKENS + 1, 128, dtype=torch.float16), w)
    assert not supports(torch.zeros(4, 128), w.float())  # fp16 / bf16 only, as the GEMM


def _row_layer_and_norm(k: int, n: int, seed: int) -> tuple[RowParallelLinear, RMSNorm]:
    gen = torch.Generator().manual_seed(seed)
    proj = RowParallelLinear(k, n, fused=True)
    proj.weight.data = (torch.randn(n, k, generator=gen) * 0.05).half()
    norm = RMSNorm(n, eps=EPS, fused=True).half()
    norm.weight.copy_(torch.rand(n, generator=gen) + 0.5)
    return proj.to(DEVICE), norm.to(DEVICE)


@pytest.mark.parametrize("m", [3, 65])
def test_layers_with_the_experiment_match_the_default(m: int, monkeypatch) -> None:
    """o_proj / down_proj -> RMSNorm with a residual, on the interpreter: with "splitk_norm" the
    projection defers (up to MAX_TOKENS rows) and the norm runs the folded kernel; the results
    equal the default path's (split-K partials, then the fused add + RMSNorm)."""
    monkeypatch.delenv("MINIVLLM_EXPERIMENTS", raising=False)
    proj, norm = _row_layer_and_norm(256, 96, seed=m)
    monkeypatch.setenv("MINIVLLM_EXPERIMENTS", "splitk_norm")
    folded, _ = _row_layer_and_norm(256, 96, seed=m)
    assert proj.norm_gemm is None and folded.norm_gemm is not None
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(m, 256, generator=gen).half().to(DEVICE)
    residual = torch.randn(m, 96, generator=gen).half().to(DEVICE)
    y_default, y_folded = proj(x, partials=True), folded(x, partials=True)
    assert isinstance(y_default, SplitKPartials)
    assert isinstance(y_folded, DeferredLinear if m <= 64 else SplitKPartials)
    expect, expect_residual = norm(y_default, residual)
    got, got_residual = norm(y_folded, residual)
    assert torch.equal(got_residual, expect_residual)
    torch.testing.assert_close(got, expect, atol=2e-3, rtol=2e-3)
    # Without partials=True (another consumer) the product itself, on either layer.
    assert torch.equal(folded(x), proj(x))


def test_rmsnorm_off_the_fused_path_materializes_a_deferred_product() -> None:
    """A norm without kernels (the torch path) computes the deferred product with torch first."""
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(32, 64, generator=gen) * 0.05).half()
    x = torch.randn(4, 64, generator=gen).half()
    residual = torch.randn(4, 32, generator=gen).half()
    norm = RMSNorm(32, eps=EPS).half()
    deferred = DeferredLinear(x, weight, None)
    got, got_residual = norm(deferred, residual)
    expect, expect_residual = norm(torch.nn.functional.linear(x, weight), residual)
    assert torch.equal(got, expect) and torch.equal(got_residual, expect_residual)
    with pytest.raises(AssertionError, match="residual"):
        norm(deferred)
