"""Triton split-K paged decode against the torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, make_paged_batch, poison_like, tolerances
from minivllm.kernels import reference
from minivllm.kernels.paged_decode import decode_attention


def _check(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, **kwargs):
    k_cache, v_cache, block_tables = make_paged_batch(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=len(seq_lens) + head_dim
    )
    gen = torch.Generator().manual_seed(head_dim)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = poison_like(q)
    ret = decode_attention(q, k_cache, v_cache, lens, block_tables, scale, out=out, **kwargs)
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
    from minivllm.kernels.paged_decode import _default_split

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
    most two splits of >= 512 tokens from 3 per SM, else ~32 programs per SM of >= 256 tokens
    (never more pieces than the block-table width holds)."""
    from minivllm.kernels.paged_decode import _default_split

    cpu = torch.device("cpu")
    assert _default_split(20, 1, 4096, cpu) == (1, 256)
    assert _default_split(12, 1, 4096, cpu) == (2, 512)
    assert _default_split(12, 1, 512, cpu) == (1, 512)
    assert _default_split(11, 1, 4096, cpu) == (12, 256)
    assert _default_split(1, 1, 1024, cpu) == (4, 256)


def test_decode_two_long_splits_by_default(monkeypatch):
    """3-4 programs per SM: the default takes at most two splits of >= 512 tokens; rows longer
    than 512 tokens use both, shorter ones one, padding rows none."""
    from minivllm.kernels import paged_decode

    calls = []
    monkeypatch.setattr(paged_decode, "_default_split",
                        lambda *a: calls.append(a) or (2, 512))
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
        decode_attention(q, k_cache, v_cache, lens, block_tables, 0.2, out=out,
                         row_order=None if order is None else order.to(torch.int32).to(DEVICE),
                         heads_first=heads_first, **kw)
        assert torch.equal(out, plain)
    expect = reference.decode_attention(q, k_cache, v_cache, lens, block_tables, 0.2,
                                        row_order=longest)
    torch.testing.assert_close(plain, expect, **tolerances(torch.float32))


def _new_token_step(dtype, with_norm, seed=7):
    """A decode step straight out of the qkv projection: raw q, k, v views of one packed tensor,
    a paged cache whose last position per row is still to be written, a padding row (seq_len 0,
    slot -1), and the rotary table and q/k norm weights."""
    from minivllm.kernels.paged_decode import NewToken

    seq_lens = [5, 17, 0, 33, 16, 70]
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 32, 16
    k_cache, v_cache, block_tables = make_paged_batch(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=seed
    )
    slots = [
        int(block_tables[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size
        if n > 0 else -1
        for b, n in enumerate(seq_lens)
    ]
    gen = torch.Generator().manual_seed(seed)
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = (2 * torch.randn(len(seq_lens), sum(sizes), generator=gen)).to(dtype).to(DEVICE)
    q, k, v = qkv.split(sizes, dim=-1)
    angles = torch.outer(torch.arange(128.0), 1.0 / 100 ** (torch.arange(0, head_dim, 2) / head_dim))
    angles = torch.cat((angles, angles), dim=-1)
    weights = [(torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(DEVICE) for _ in "qk"]
    new_token = NewToken(
        k=k.view(-1, num_kv_heads, head_dim),
        v=v.view(-1, num_kv_heads, head_dim),
        slot_mapping=torch.tensor(slots, dtype=torch.int32, device=DEVICE),
        cos_cache=angles.cos().to(dtype).to(DEVICE),
        sin_cache=angles.sin().to(dtype).to(DEVICE),
        q_weight=weights[0] if with_norm else None,
        k_weight=weights[1] if with_norm else None,
        q_eps=1e-6,
        k_eps=1e-5,
    )
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return q.view(-1, num_heads, head_dim), new_token, lens, k_cache, v_cache, block_tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_norm", [True, False])  # Qwen3, Qwen2
@pytest.mark.parametrize("max_num_splits", [1, 3])
def test_decode_finishes_the_new_token(max_num_splits, with_norm, dtype):
    """With `new_token` the kernel normalises and rotates the raw query and the new key, stores
    the new k and v into their slots (the one program whose key range holds them; none for the
    padding row) and attends over them: the reference doing the same in torch ops, and the
    unfused route (qk_norm_rope_store_kv, then the plain decode kernel) agree."""
    from minivllm.kernels.qk_norm_rope import qk_norm_rope_store_kv

    q, nt, lens, k_cache, v_cache, block_tables = _new_token_step(dtype, with_norm)
    kw = {"max_num_splits": max_num_splits, "block_n": 16, "min_partition": 16}
    caches = k_cache.clone(), v_cache.clone()
    out = decode_attention(q, *caches, lens, block_tables, 0.3, out=poison_like(q),
                           new_token=nt, **kw)
    ref_caches = k_cache.clone(), v_cache.clone()
    expect = reference.decode_attention(q, *ref_caches, lens, block_tables, 0.3, new_token=nt)
    tol = tolerances(dtype)
    torch.testing.assert_close(out, expect, **tol)
    torch.testing.assert_close(caches, ref_caches, **tol)
    assert not torch.equal(caches[0], k_cache)  # the new keys were written
    # The unfused route: the q/k-norm + rotary kernel stores k and v, then plain attention.
    unfused_caches = k_cache.clone(), v_cache.clone()
    slots = torch.where(lens > 0, nt.slot_mapping, -1)
    rq = qk_norm_rope_store_kv(q, nt.k, nt.v, (lens.long() - 1).clamp(min=0), nt.cos_cache, nt.sin_cache,
                               *unfused_caches, slots, nt.q_weight, nt.k_weight, nt.q_eps,
                               nt.k_eps)
    unfused = decode_attention(rq, *unfused_caches, lens, block_tables, 0.3, **kw)
    torch.testing.assert_close(out, unfused, **tol)
    torch.testing.assert_close(caches, unfused_caches, **tol)
