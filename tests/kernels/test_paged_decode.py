"""Triton split-K paged decode against the torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, make_paged_batch, poison_like, tolerances
from minivllm.kernels import reference
from minivllm.kernels.paged_decode import _decode_attention, decode_attention


def _check(
    seq_lens,
    num_heads,
    num_kv_heads,
    head_dim,
    block_size,
    dtype,
    launch=decode_attention,
    **kwargs,
):
    k_cache, v_cache, block_tables = make_paged_batch(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=len(seq_lens) + head_dim
    )
    gen = torch.Generator().manual_seed(head_dim)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = poison_like(q)
    ret = launch(q, k_cache, v_cache, lens, block_tables, scale, out=out, **kwargs)
    assert ret is out
    expect = reference.decode_attention(q, k_cache, v_cache, lens, block_tables, scale)
    torch.testing.assert_close(out, expect, **tolerances(dtype))
    for b, n in enumerate(seq_lens):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (16, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size,block_n", [(16, 32), (32, 32), (256, 64)])
def test_decode(dtype, num_heads, num_kv_heads, head_dim, block_size, block_n):
    # ragged: 1 token, block edges, several blocks, a padding row (0) in the middle
    seq_lens = [1, block_size - 1, 0, block_size, block_size + 1, 3 * block_size + 5, 300]
    # small partitions so that several splits (and the reduce) are exercised
    _check(
        seq_lens,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        dtype,
        block_n=block_n,
        min_partition=2 * block_n,
        num_warps=4,
        num_stages=1,
    )


@pytest.mark.parametrize("max_num_splits", [None, 1, 3, 64])
def test_decode_split_counts(max_num_splits):
    """Default grid, one split (no reduce work), a count that doesn't divide the context, many."""
    _check(
        [700, 33, 1, 0],
        8,
        2,
        32,
        16,
        torch.float32,
        max_num_splits=max_num_splits,
        min_partition=32,
        block_n=16,
    )


@pytest.mark.parametrize("select_lookup", [True, False])
def test_decode_many_splits(select_lookup):
    """More splits (66) than the reduce merges in one step (64), and both block-id lookups."""
    _check(
        [2100, 5, 0],
        4,
        2,
        32,
        16,
        torch.float32,
        max_num_splits=128,
        min_partition=32,
        block_n=16 if select_lookup else 32,
        launch=_decode_attention,
        select_lookup=select_lookup,
    )


def test_decode_block_tables_wider_than_needed():
    """CUDA-graph buffers: block tables padded with -1 far past every sequence."""
    k_cache, v_cache, block_tables = make_paged_batch([40, 9], 2, 32, 16, torch.float32)
    wide = torch.full((2, 20), -1, dtype=torch.int32, device=DEVICE)
    wide[:, : block_tables.shape[1]] = block_tables
    q = torch.randn(2, 4, 32, device=DEVICE)
    lens = torch.tensor([40, 9], dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k_cache, v_cache, lens, wide, 0.3, min_partition=16, block_n=16)
    expect = reference.decode_attention(q, k_cache, v_cache, lens, block_tables, 0.3)
    torch.testing.assert_close(out, expect, **tolerances(torch.float32))


def test_decode_strided_query():
    """q as a view into a fused qkv buffer."""
    k_cache, v_cache, block_tables = make_paged_batch([50, 17], 2, 32, 16, torch.float16)
    qkv = torch.randn(2, 8 * 32, device=DEVICE).to(torch.float16)
    q = qkv[:, : 4 * 32].view(2, 4, 32)
    lens = torch.tensor([50, 17], dtype=torch.int32, device=DEVICE)
    out = decode_attention(
        q, k_cache, v_cache, lens, block_tables, 0.2, block_n=16, min_partition=16
    )
    expect = reference.decode_attention(q, k_cache, v_cache, lens, block_tables, 0.2)
    torch.testing.assert_close(out, expect, **tolerances(torch.float16))


def _forbid_reduce(monkeypatch):
    """Make a launch of the reduce kernel fail: the single-split path must not need it."""
    from minivllm.kernels import paged_decode

    monkeypatch.setattr(paged_decode, "_paged_decode_reduce_kernel", None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (16, 2)])
@pytest.mark.parametrize("block_size,block_n", [(16, 32), (256, 64)])
def test_decode_single_split(monkeypatch, dtype, num_heads, num_kv_heads, block_size, block_n):
    """max_num_splits=1: the main kernel writes the output itself, no reduce; padding rows
    (seq_len 0) first, in the middle and last come out as zeros."""
    _forbid_reduce(monkeypatch)
    seq_lens = [0, 1, block_size - 1, 0, block_size + 1, 3 * block_size + 5, 300, 0]
    _check(
        seq_lens,
        num_heads,
        num_kv_heads,
        64,
        block_size,
        dtype,
        max_num_splits=1,
        block_n=block_n,
        min_partition=2 * block_n,
        num_warps=4,
        num_stages=1,
    )


def test_decode_single_split_by_default_at_large_batch(monkeypatch):
    """A batch that fills the GPU (8 KV heads, >= 4 programs per SM) gets one split by default."""
    from minivllm.kernels.decode_split import _default_split

    batch, num_kv_heads, block_size = 80, 8, 16
    gen = torch.Generator().manual_seed(80)
    seq_lens = torch.randint(1, 40, (batch,), generator=gen)
    seq_lens[[0, 41, batch - 1]] = 0
    device = torch.device(DEVICE)
    max_context = -(-int(seq_lens.max()) // block_size) * block_size
    assert _default_split(batch, num_kv_heads, max_context, device)[0] == 1
    _forbid_reduce(monkeypatch)
    _check(seq_lens.tolist(), 16, num_kv_heads, 32, block_size, torch.float32)


def test_default_split_by_programs_per_sm():
    """The CPU stands in for a GPU of 4 SMs: one split from 5 (row, KV head) programs per SM, at
    most two splits of >= 512 tokens from 3 per SM, else ~32 programs per SM of >= 256 tokens,
    and up to one pair per two SMs splits of >= 64 tokens in a grid of ~4 split programs per SM
    (never more pieces than the block-table width holds)."""
    from minivllm.kernels.decode_split import _GRID_PROGRAMS_PER_SM, _default_split

    cpu = torch.device("cpu")
    assert _default_split(20, 1, 4096, cpu) == (1, 256, 1)
    assert _default_split(12, 1, 4096, cpu) == (2, 512, 2)
    assert _default_split(12, 1, 512, cpu) == (1, 512, 1)
    assert _default_split(11, 1, 4096, cpu) == (12, 256, 12)
    assert _default_split(3, 1, 4096, cpu) == (16, 256, 16)
    assert _GRID_PROGRAMS_PER_SM == 4
    assert _default_split(2, 1, 4096, cpu) == (64, 64, 8)
    assert _default_split(1, 1, 1024, cpu) == (16, 64, 16)
    assert _default_split(1, 1, 16384, cpu) == (128, 64, 16)
    assert _default_split(1, 1, 256, cpu) == (4, 64, 4)


@pytest.mark.parametrize("grid_splits", [1, 3])
def test_decode_programs_loop_over_splits(grid_splits):
    """A grid with fewer split programs than a row has splits (7 here, of 32 tokens): each
    program runs every grid_splits-th split, and the rows come out as from one program per
    split; padding rows stay zeros."""
    _check(
        [224, 0, 1, 100, 33],
        4,
        2,
        32,
        16,
        torch.float32,
        launch=_decode_attention,
        max_num_splits=8,
        min_partition=32,
        block_n=32,
        grid_splits=grid_splits,
    )


def test_decode_two_long_splits_by_default(monkeypatch):
    """3-4 programs per SM: the default takes at most two splits of >= 512 tokens; rows longer
    than 512 tokens use both, shorter ones one, padding rows none."""
    from minivllm.kernels import decode_split, paged_decode

    calls = []
    monkeypatch.setattr(
        paged_decode, "_default_split", lambda *a: calls.append(a) or decode_split._Split(2, 512, 2)
    )
    _check([700, 0, 1030, 511, 64, 512], 4, 2, 32, 16, torch.float32)
    assert calls


@pytest.mark.parametrize("heads_first", [True, False])
@pytest.mark.parametrize("max_num_splits", [1, 4])
def test_decode_row_order_changes_nothing_but_the_schedule(max_num_splits, heads_first):
    """Programs taking the rows longest first (padding last), or in any permutation, with the KV
    heads or the rows in the grid's fastest dimension, give every row exactly the output of the
    unordered launch."""
    seq_lens = [40, 0, 300, 1, 129, 77]
    k_cache, v_cache, block_tables = make_paged_batch(seq_lens, 2, 32, 16, torch.float32, seed=5)
    q = torch.randn(len(seq_lens), 4, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    kw = {"max_num_splits": max_num_splits, "block_n": 32, "min_partition": 64}
    plain = decode_attention(q, k_cache, v_cache, lens, block_tables, 0.2, **kw)
    longest = torch.argsort(lens.cpu(), descending=True, stable=True)
    shuffled = torch.randperm(len(seq_lens), generator=torch.Generator().manual_seed(1))
    for order in (longest, shuffled, None):
        out = poison_like(q)
        _decode_attention(
            q,
            k_cache,
            v_cache,
            lens,
            block_tables,
            0.2,
            out=out,
            row_order=None if order is None else order.to(torch.int32).to(DEVICE),
            heads_first=heads_first,
            **kw,
        )
        assert torch.equal(out, plain)
    expect = reference.decode_attention(
        q, k_cache, v_cache, lens, block_tables, 0.2, row_order=longest
    )
    torch.testing.assert_close(plain, expect, **tolerances(torch.float32))


@pytest.mark.parametrize("block_size,block_n", [(16, 32), (256, 64)])
@pytest.mark.parametrize("max_num_splits,grid_splits", [(1, None), (4, None), (8, 3)])
def test_decode_early_loads_change_nothing(max_num_splits, grid_splits, block_size, block_n):
    """Reading each program's first key tile (all but the row's newest key) before the PDL wait
    and the newest key after it gives exactly the plain launch's output: one split, several, and
    programs looping over splits; rows of 1 token, with the newest key in the first tile,
    past it, and padding."""
    seq_lens = [1, 0, 20, block_n, block_n + 1, 300, 77]
    k_cache, v_cache, block_tables = make_paged_batch(
        seq_lens, 2, 32, block_size, torch.float32, seed=7
    )
    q = torch.randn(len(seq_lens), 4, 32, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    kw = {
        "max_num_splits": max_num_splits,
        "min_partition": block_n,
        "block_n": block_n,
        "grid_splits": grid_splits,
    }
    plain = _decode_attention(q, k_cache, v_cache, lens, block_tables, 0.2, **kw)
    out = poison_like(q)
    _decode_attention(q, k_cache, v_cache, lens, block_tables, 0.2, out=out, early_loads=True, **kw)
    assert torch.equal(out, plain)
    expect = reference.decode_attention(q, k_cache, v_cache, lens, block_tables, 0.2)
    torch.testing.assert_close(out, expect, **tolerances(torch.float32))
