"""The o projection that merges split decode attention itself (kernels/merge_linear.py) against
the reduce kernel followed by the plain product."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, make_paged_batch, tolerances
from minivllm.kernels.merge_linear import merge_linear
from minivllm.kernels.paged_decode import _decode_attention


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("max_num_splits", [2, 5])
def test_merge_linear_matches_reduce_then_product(dtype, max_num_splits):
    """Rows of 1 to 300 tokens (one split to several) and a padding row, 19 of them (two row
    tiles), 80 outputs (a partial n tile): the sum of the per-head partial products is the
    merged attention output times W^T, padding rows zero."""
    seq_lens = [1, 0, 20, 64, 65, 300, 77, 129, 3, 250, 16, 17, 200, 5, 90, 31, 32, 33, 160]
    heads, kv_heads, head_dim, n = 4, 2, 32, 80
    k_cache, v_cache, block_tables = make_paged_batch(
        seq_lens, kv_heads, head_dim, 16, dtype, seed=3
    )
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(n, heads * head_dim, generator=gen) * 0.1).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    kw = {"max_num_splits": max_num_splits, "min_partition": 32, "block_n": 32}
    merged = _decode_attention(q, k_cache, v_cache, lens, block_tables, 0.3, **kw)
    partials = _decode_attention(q, k_cache, v_cache, lens, block_tables, 0.3, reduce=False, **kw)
    # (not isinstance(..., DecodePartials): another test module reloads paged_decode)
    assert not isinstance(partials, torch.Tensor) and partials.part_out.shape[2] == max_num_splits
    parts = merge_linear(partials, weight)
    assert parts.shape == (heads, len(seq_lens), n) and parts.dtype == torch.float32
    expect = merged.flatten(1).float() @ weight.float().t()
    torch.testing.assert_close(parts.sum(0), expect, **tolerances(dtype))
    assert torch.equal(parts[:, 1], torch.zeros_like(parts[:, 1]))  # the padding row


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_merge_linear_add_residual_matches_fused_add_rmsnorm(dtype):
    """With the residual added by the last head of each tile: h equals fused_add_rmsnorm's new
    residual over merge_linear's partial sums bit for bit (the heads added in the same order),
    its squares summed per column tile add up to h's, and the counters are left zero."""
    from minivllm.kernels.fused_norm import fused_add_rmsnorm
    from minivllm.kernels.linear import num_tile_counters
    from minivllm.kernels.merge_linear import merge_linear_add_residual

    seq_lens = [1, 0, 20, 300, 77, 129, 3, 250, 16, 17, 200, 5, 90, 31, 32, 33, 160, 64, 65]
    heads, kv_heads, head_dim, n = 4, 2, 32, 80
    k_cache, v_cache, block_tables = make_paged_batch(
        seq_lens, kv_heads, head_dim, 16, dtype, seed=4
    )
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(n, heads * head_dim, generator=gen) * 0.1).to(dtype).to(DEVICE)
    residual = torch.randn(len(seq_lens), n, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    kw = {"max_num_splits": 3, "min_partition": 32, "block_n": 32}
    partials = _decode_attention(q, k_cache, v_cache, lens, block_tables, 0.3, reduce=False, **kw)
    norm_w = torch.ones(n, dtype=dtype, device=DEVICE)
    _, expect_h = fused_add_rmsnorm(merge_linear(partials, weight), residual, norm_w, 1e-6)
    counters = torch.zeros(num_tile_counters(n), dtype=torch.int32, device=DEVICE)
    h, sumsq = merge_linear_add_residual(partials, weight, residual, counters)
    torch.testing.assert_close(h, expect_h, atol=0, rtol=0)
    torch.testing.assert_close(sumsq.sum(0), h.float().square().sum(-1), rtol=1e-5, atol=1e-5)
    assert not counters.any()


def test_row_parallel_layer_takes_unmerged_splits():
    """RowParallelLinear given a split decode's DecodePartials (layers.attention's
    MERGE_SPLITS_IN_O_PROJ): a PendingProduct on the Triton GEMM's path, else (a bias, no
    fused kernels) the merged product itself plus the bias."""
    from minivllm.layers import fused_kernels
    from minivllm.layers.linear import PendingProduct, RowParallelLinear

    seq_lens = [300, 20, 129]
    heads, kv_heads, head_dim, n = 4, 2, 32, 64
    k_cache, v_cache, block_tables = make_paged_batch(
        seq_lens, kv_heads, head_dim, 16, torch.float16, seed=5
    )
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=gen).half().to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    kw = {"max_num_splits": 3, "min_partition": 32, "block_n": 32}
    merged = _decode_attention(q, k_cache, v_cache, lens, block_tables, 0.3, **kw)
    partials = _decode_attention(q, k_cache, v_cache, lens, block_tables, 0.3, reduce=False, **kw)
    fused = RowParallelLinear(heads * head_dim, n)
    fused.gemm = fused_kernels("linear", True)
    with_bias = RowParallelLinear(heads * head_dim, n, bias=True)
    assert with_bias.gemm is None
    for layer in (fused, with_bias):
        layer.weight.data = (torch.randn(n, heads * head_dim, generator=gen) * 0.1).half()
    with_bias.bias.data = torch.randn(n, generator=gen).half()
    pending = fused(partials, partials=True)
    assert isinstance(pending, PendingProduct) and pending.num_tokens == len(seq_lens)
    expect = merged.flatten(1).float() @ fused.weight.float().t()
    torch.testing.assert_close(
        pending.partials().materialize().float(), expect, **tolerances(torch.float16)
    )
    got = with_bias(partials, partials=True)
    expect = merged.flatten(1).float() @ with_bias.weight.float().t() + with_bias.bias.float()
    torch.testing.assert_close(got.float(), expect, **tolerances(torch.float16))
