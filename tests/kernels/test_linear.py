"""The decode-size GEMM and its split-K partial sums (kernels/linear.py), and the add + RMSNorm
that consumes them (kernels/fused_norm.py), against plain torch (interpreter on the CPU in
float16; bf16 in tests/gpu)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from kernel_testing import DEVICE
from minivllm.layers.linear import SplitKPartials
from minivllm.layers.rmsnorm import RMSNorm


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _operands(m: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = _gen(m * n + k)
    x = torch.randn(m, k, generator=gen).half()
    w = (torch.randn(n, k, generator=gen) * 0.05).half()
    return x, w


@pytest.mark.parametrize(
    ("m", "n", "k", "config"),
    [
        (1, 64, 256, None),  # the default configuration
        (7, 96, 256, None),  # N not a multiple of the tile: masked columns
        (33, 128, 200, (1, 64, 64, 128, 4, 3)),  # M and K not multiples of the tile: zero fill
        (100, 6144, 64, None),  # past 64 tokens and more tiles than SMs: 128-row tiles
        (70, 128, 192, (1, 64, 128, 64, 4, 2, False)),  # token rows on the MMA's M side
    ],
)
def test_linear_matches_the_product(m, n, k, config) -> None:
    from minivllm.kernels.linear import linear

    x, w = _operands(m, n, k)
    y = linear(x.to(DEVICE), w.to(DEVICE), config=config)
    assert y.shape == (m, n) and y.dtype == torch.float16
    torch.testing.assert_close(y.cpu().float(), x.float() @ w.float().T, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    ("m", "n", "k", "config"),
    [
        (1, 64, 1024, None),  # the default configuration: 8 splits
        (7, 128, 512, (4, 16, 64, 64, 4, 3)),
        (33, 64, 2048, (4, 64, 64, 128, 4, 5)),  # M not a multiple of BM: masked rows
        (100, 128, 320, (2, 64, 64, 64, 4, 3)),  # K not a multiple of splits x BK: short last
    ],
)
def test_linear_partials_match_the_product(m, n, k, config) -> None:
    from minivllm.kernels.linear import GemmConfig, gemm_config, linear

    x, w = _operands(m, n, k)
    parts = linear(x.to(DEVICE), w.to(DEVICE), partials=True, config=config)
    cfg = GemmConfig(*config) if config else gemm_config(m, n, k, partials=True)
    splits, bk = cfg.splits, cfg.block_k
    assert parts.dtype == torch.float32 and parts.shape == (splits, m, n)
    # Part s is the product over its own slice of K: whole BK tiles, the last slice the rest.
    per_split = math.ceil(math.ceil(k / bk) / splits) * bk
    for s in range(splits):
        ks = slice(s * per_split, (s + 1) * per_split)
        expect = x[:, ks].float() @ w[:, ks].float().T
        torch.testing.assert_close(parts[s].cpu(), expect, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(parts.sum(0).cpu(), x.float() @ w.float().T, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize(
    ("m", "n", "k", "config"),
    [
        (1, 64, 256, None),  # the default configuration
        (7, 96, 256, None),  # N not a multiple of the tile: the gate tile runs into the up rows
        (33, 128, 200, (1, 64, 64, 128, 4, 3)),  # M and K not multiples of the tile: zero fill
        (100, 192, 64, None),  # past 64 tokens: 64- or 128-token tiles
        (70, 128, 192, (1, 64, 128, 64, 4, 2, False)),  # token rows on the MMA's M side
    ],
)
def test_gated_linear_is_silu_and_mul_of_the_product(m, n, k, config) -> None:
    from minivllm.kernels.linear import linear

    x, w = _operands(m, 2 * n, k)
    y = linear(x.to(DEVICE), w.to(DEVICE), gated=True, config=config)
    assert y.shape == (m, n) and y.dtype == torch.float16
    product = (x.float() @ w.float().T).half().float()  # as the plain GEMM hands it over
    gate, up = product[:, :n], product[:, n:]
    expect = (torch.nn.functional.silu(gate).half().float() * up).half()
    torch.testing.assert_close(y.cpu(), expect, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    ("m", "n", "k", "config", "kind", "early"),
    [
        (1, 64, 1024, None, "plain", 256),  # 256 of 1024 columns early, the loop the rest
        (70, 128, 192, (1, 64, 128, 64, 4, 2, False), "plain", 128),  # token rows on M
        (33, 64, 2048, (4, 64, 64, 128, 4, 5), "partials", 512),  # whole slices early
        (100, 128, 320, (2, 64, 64, 64, 4, 3), "partials", 256),  # 128 of 192; a short slice
        (7, 96, 256, None, "gated", 128),  # the gate and the up tile both early
    ],
)
def test_early_weight_columns_give_the_same_product(m, n, k, config, kind, early) -> None:
    """Weight columns read before the PDL wait (`early`) change only when they are read: the
    result is the product, and the default kernel's within float32 summation order."""
    from minivllm.kernels.linear import linear

    x, w = _operands(m, 2 * n if kind == "gated" else n, k)
    x, w = x.to(DEVICE), w.to(DEVICE)
    options = {"partials": kind == "partials", "gated": kind == "gated", "config": config}
    got = linear(x, w, early=early, **options).cpu().float()
    default = linear(x, w, **options).cpu().float()
    torch.testing.assert_close(got, default, atol=2e-3, rtol=2e-3)
    if kind == "partials":
        got = got.sum(0)
    if kind != "gated":
        torch.testing.assert_close(got, x.float().cpu() @ w.float().cpu().T, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="early=-1"):
        linear(x, w, early=-1, **options)


def test_gemm_config_and_supports_decline_what_they_do_not_fit() -> None:
    from minivllm.kernels.linear import MAX_COLUMN_TOKENS, MAX_TOKENS, gemm_config, supports

    assert gemm_config(MAX_TOKENS, 1024, 3072, partials=True) is not None
    assert gemm_config(MAX_TOKENS + 1, 1024, 3072, partials=True) is None  # cuBLAS fills the GPU
    assert gemm_config(0, 1024, 3072, partials=False) is None
    assert gemm_config(MAX_COLUMN_TOKENS + 1, 4096, 1024, partials=False) is None  # cuBLAS
    assert gemm_config(8, 1024, 3072, partials=True).splits == 8
    assert gemm_config(8, 1024, 256, partials=True).splits == 2  # fewer splits when K is short
    assert gemm_config(8, 4096, 1024, partials=True, splits=2).splits == 2  # qkv's own count
    assert gemm_config(8, 4096, 128, partials=True, splits=4).splits == 1  # K short for more
    for m in (1, 64, 128):  # two weight tiles per stage: fewer stages where they would not fit
        cfg = gemm_config(m, 3072, 1024, partials=False, gated=True)
        assert (2 * cfg.block_n + cfg.block_m) * cfg.block_k * 2 * cfg.num_stages <= 200_000
    x = torch.zeros(4, 64, dtype=torch.float16)
    assert supports(x, torch.zeros(128, 64, dtype=torch.float16), gated=True)
    assert not supports(x, torch.zeros(127, 64, dtype=torch.float16), gated=True)  # odd rows
    assert not supports(x, torch.zeros(128, 64, dtype=torch.float16), partials=True, gated=True)
    assert gemm_config(8, 4096, 1024, partials=False).splits == 1  # the consumer wants y
    # 65-128 tokens: 64-token tiles while one program per SM covers the output, else 128.
    assert gemm_config(128, 4096, 1024, partials=False).block_m == 64  # 2 x 64 tiles
    assert gemm_config(128, 6144, 1024, partials=False).block_m == 128  # 2 x 96 > 132 SMs
    assert gemm_config(128, 6144, 1024, partials=False, num_sms=192).block_m == 64
    assert supports(
        torch.randn(MAX_COLUMN_TOKENS + 1, 64).half(), torch.randn(32, 64).half(), partials=True
    )
    x, w = torch.randn(16, 64).half(), torch.randn(32, 64).half()
    assert supports(x, w)
    assert not supports(x.float(), w.float())  # fp16 / bf16 only
    assert not supports(torch.randn(MAX_TOKENS + 1, 64).half(), w, partials=True)
    assert not supports(torch.randn(MAX_COLUMN_TOKENS + 1, 64).half(), w)
    assert not supports(x, w.t().contiguous().t())  # weight not contiguous
    assert not supports(torch.randn(16, 66).half()[:, 1:65], w)  # rows not 16-byte aligned
    assert not supports(x[:, :60], w[:, :60].contiguous())  # K * 2 bytes not a multiple of 16


def test_large_k_gemms_go_to_cublas_past_fewer_tokens() -> None:
    """Split-K GEMMs of K >= 4096 (Qwen3-8B / 14B's o and down) up to 32 tokens; smaller K keeps
    256, and the column-parallel ones 128 at any K."""
    from minivllm.kernels.linear import LARGE_K, gemm_config, max_tokens, supports

    assert LARGE_K == 4096
    assert (max_tokens(4096, True), max_tokens(12288, True)) == (32, 32)
    assert (max_tokens(3072, True), max_tokens(4095, True)) == (256, 256)  # Qwen3-0.6B's
    assert max_tokens(1024, False) == max_tokens(4096, False) == 128
    assert gemm_config(32, 4096, 4096, partials=True) is not None
    assert gemm_config(33, 4096, 4096, partials=True) is None
    assert gemm_config(128, 6144, 4096, partials=False) is not None
    w = torch.zeros(64, 4096, dtype=torch.float16)
    assert supports(torch.zeros(32, 4096, dtype=torch.float16), w, partials=True)
    assert not supports(torch.zeros(33, 4096, dtype=torch.float16), w, partials=True)
    assert supports(torch.zeros(128, 4096, dtype=torch.float16), w)


def test_large_k_limit_from_the_environment() -> None:
    """MINIVLLM_GEMM_LARGE_K=0 lifts the limit; a value that is not a count is named."""
    import subprocess
    import sys

    code = (
        "from minivllm.kernels import linear; print(linear.LARGE_K, linear.max_tokens(4096, True))"
    )

    def run(value: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "MINIVLLM_GEMM_LARGE_K": value}
        cmd = [sys.executable, "-c", code]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)

    out = run("0")
    assert out.returncode == 0 and out.stdout.split() == ["0", "256"], out.stderr
    out = run("big")
    assert out.returncode != 0 and "MINIVLLM_GEMM_LARGE_K='big'" in out.stderr


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


def test_gated_mlp_on_the_interpreter_matches_torch() -> None:
    """gate/up's GEMM with SiLU-and-multiply in its epilogue, on the interpreter (float16),
    against torch, up to GATED_MAX_TOKENS rows; past it, None (the caller runs both)."""
    from minivllm.layers import fused_kernels
    from minivllm.layers.linear import GATED_MAX_TOKENS, MergedColumnParallelLinear

    proj = MergedColumnParallelLinear(64, [64, 64])
    assert proj.gated
    assert not MergedColumnParallelLinear(64, [64, 32]).gated  # not a gate/up pair
    proj.gemm = fused_kernels("linear", True)
    proj.weight.data = (
        torch.randn(128, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    ).half()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).half()
    got = proj.silu_and_mul(x)
    gate, up = (x.float() @ proj.weight.float().T).chunk(2, dim=-1)
    torch.testing.assert_close(
        got.float(), torch.nn.functional.silu(gate) * up, atol=1e-2, rtol=1e-2
    )
    assert proj.silu_and_mul(torch.zeros(GATED_MAX_TOKENS + 1, 64).half()) is None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MINIVLLM_DECODE_EARLY_LOADS", "true", "expected 1 (on) or 0 (off)"),
        ("MINIVLLM_GEMM_EARLY_COLUMNS", "256k", "expected a number of weight columns"),
        ("MINIVLLM_GEMM_EARLY_COLUMNS", "-4", "expected a number of weight columns"),
    ],
)
def test_a_bad_experiment_switch_is_named(name: str, value: str, message: str) -> None:
    """The engine's environment switches refuse a value they cannot read, naming it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, name: value}
    code = "import minivllm.layers.linear, minivllm.layers.attention"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0
    assert f"ValueError: {name}={value!r}: {message}" in proc.stderr
