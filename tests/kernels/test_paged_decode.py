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
    monkeypatch.setattr(paged_decode, "_default_split", lambda *a: calls.append(a) or (2, 512))
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


def _counter_buffers(device: str) -> list[torch.Tensor]:
    """The fused reduce's arrival-counter buffers on `device`, the one launches use last."""
    from minivllm.kernels import paged_decode

    return paged_decode._ARRIVAL_COUNTERS[(device, 0 if device == "cuda" else None)]


@pytest.mark.parametrize(
    "dtype,num_heads,num_kv_heads,heads_first",
    [(torch.float16, 4, 2, True), (torch.float32, 8, 2, False)],
)
def test_decode_fused_reduce_equals_the_reduce_kernel(
    monkeypatch, dtype, num_heads, num_kv_heads, heads_first
):
    """fused_reduce: the last split of each (row, KV head) merges them, no reduce launch. Rows of
    several splits (4 of 4; 3; 2), shorter than one partition (1 split), padding rows (seq_len 0,
    first and in the middle: zeros), taken longest first: the two-kernel path's exact bits. The
    arrival counters are zero after every call, so a second call (a graph replay) merges too."""
    seq_lens = [0, 221, 20, 1, 0, 96, 33]
    k_cache, v_cache, block_tables = make_paged_batch(
        seq_lens, num_kv_heads, 32, 16, dtype, seed=11
    )
    q = torch.randn(len(seq_lens), num_heads, 32, generator=torch.Generator().manual_seed(11))
    q = q.to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    order = torch.argsort(lens.cpu(), descending=True, stable=True).to(torch.int32).to(DEVICE)
    kw = {"max_num_splits": 4, "min_partition": 32, "block_n": 16, "row_order": order}
    kw["heads_first"] = heads_first
    two_kernels = _decode_attention(q, k_cache, v_cache, lens, block_tables, 0.3, **kw)
    _forbid_reduce(monkeypatch)
    for _ in range(2):
        out = poison_like(q)
        _decode_attention(
            q, k_cache, v_cache, lens, block_tables, 0.3, out=out, fused_reduce=True, **kw
        )
        assert torch.equal(out, two_kernels)
        assert _counter_buffers(DEVICE)[-1].count_nonzero() == 0
    expect = reference.decode_attention(q, k_cache, v_cache, lens, block_tables, 0.3)
    torch.testing.assert_close(out, expect, **tolerances(dtype))
    assert torch.equal(out[[0, 4]], torch.zeros_like(out[[0, 4]]))


@pytest.mark.slow  # 65 programs of real work on the interpreter (~3 s)
def test_decode_fused_reduce_past_one_merge_step(monkeypatch):
    """65 splits: the merge takes two steps of 64 (as the reduce kernel does), bit for bit."""
    seq_lens = [1030, 0]
    k_cache, v_cache, block_tables = make_paged_batch(seq_lens, 1, 16, 16, torch.float32, seed=3)
    q = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    kw = {"max_num_splits": 72, "min_partition": 16, "block_n": 16}
    two_kernels = decode_attention(q, k_cache, v_cache, lens, block_tables, 0.25, **kw)
    _forbid_reduce(monkeypatch)
    out = decode_attention(q, k_cache, v_cache, lens, block_tables, 0.25, fused_reduce=True, **kw)
    assert torch.equal(out, two_kernels)
    assert _counter_buffers(DEVICE)[-1].count_nonzero() == 0


def test_arrival_counters_grow_and_keep_the_old_buffers():
    """A larger grid gets a larger zeroed buffer; the smaller one stays (a graph may hold it)."""
    from minivllm.kernels import paged_decode

    like = torch.empty(0, device=DEVICE)
    first = paged_decode._arrival_counters(like, 8)
    assert paged_decode._arrival_counters(like, first.numel()) is first
    grown = paged_decode._arrival_counters(like, first.numel() + 1)
    assert grown.numel() > first.numel() and grown.count_nonzero() == 0
    assert any(b is first for b in _counter_buffers(DEVICE))


def test_attention_layer_reads_the_experiment_when_built(monkeypatch):
    """MINIVLLM_EXPERIMENTS=decode_fused_reduce: the layer built then passes fused_reduce to the
    kernel (a split decode launches no reduce) and attends exactly as the default layer."""
    from minivllm.layers.attention import Attention, AttentionMetadata, get_attention_backend

    backend = get_attention_backend("triton")
    seq_lens = [300, 0]  # 2 splits of >= 256 tokens by default on the CPU's "4 SMs"
    k_cache, v_cache, block_tables = make_paged_batch(seq_lens, 2, 16, 16, torch.float32)
    wide = torch.full((2, 32), -1, dtype=torch.int32, device=DEVICE)
    wide[:, : block_tables.shape[1]] = block_tables
    meta = AttentionMetadata(
        num_decodes=2,
        slot_mapping=torch.full((2,), -1, dtype=torch.int32, device=DEVICE),
        decode_seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        decode_block_tables=wide,
        prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32, device=DEVICE),
        prefill_seq_lens=torch.zeros(0, dtype=torch.int32, device=DEVICE),
        prefill_block_tables=torch.zeros(0, 32, dtype=torch.int32, device=DEVICE),
        max_prefill_query_len=0,
    )
    q = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    v = torch.zeros(2, 2, 16, device=DEVICE)

    def attend() -> torch.Tensor:
        layer = Attention(4, 2, 16, 0.25, backend)
        layer.k_cache, layer.v_cache = k_cache, v_cache
        return layer(q, None, v, meta)

    monkeypatch.delenv("MINIVLLM_EXPERIMENTS", raising=False)
    default = attend()
    monkeypatch.setenv("MINIVLLM_EXPERIMENTS", "decode_fused_reduce")
    _forbid_reduce(monkeypatch)
    assert torch.equal(attend(), default)


def _rope_case(seq_lens, num_heads, num_kv_heads, dtype, has_norm, head_dim=32, block_size=16):
    """A decode step's raw q, k, v (views into one qkv buffer), its positions and slots (-1 for a
    padding row), cos/sin tables and q/k norm weights, over a random paged cache."""
    k_cache, v_cache, block_tables = make_paged_batch(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=len(seq_lens) + num_heads
    )
    gen = torch.Generator().manual_seed(num_heads + has_norm)
    batch, d = len(seq_lens), head_dim
    qkv = (3 * torch.randn(batch, (num_heads + 2 * num_kv_heads) * d, generator=gen)).to(dtype)
    q, k, v = qkv.to(DEVICE).split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    tables = block_tables.cpu()
    slots = [
        int(tables[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else -1
        for b, n in enumerate(seq_lens)
    ]
    case = {
        "q": q.view(batch, num_heads, d),
        "k": k.view(batch, num_kv_heads, d),
        "v": v.view(batch, num_kv_heads, d),
        "positions": torch.tensor([max(n - 1, 0) for n in seq_lens], device=DEVICE),
        "cos_cache": torch.randn(512, d, generator=gen).to(dtype).to(DEVICE),
        "sin_cache": torch.randn(512, d, generator=gen).to(dtype).to(DEVICE),
        "slot_mapping": torch.tensor(slots, dtype=torch.int32, device=DEVICE),
        "q_weight": (torch.rand(d, generator=gen) + 0.5).to(dtype).to(DEVICE) if has_norm else None,
        "k_weight": (torch.rand(d, generator=gen) + 0.5).to(dtype).to(DEVICE) if has_norm else None,
    }
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    # The new tokens' slots hold NaN: a program that read one from the cache would spread it.
    for slot in slots:
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = float("nan")
            v_cache[slot // block_size, slot % block_size] = float("nan")
    return case, k_cache, v_cache, lens, block_tables


@pytest.mark.parametrize(
    "dtype,num_heads,num_kv_heads,has_norm,max_num_splits,fused_reduce,heads_first",
    [
        (torch.float16, 4, 2, True, 3, False, True),  # GQA 2, Qwen3's norm, the reduce kernel
        (torch.float32, 8, 2, False, 3, True, True),  # GQA 4, Qwen2 (no norm), fused reduce
        (torch.float16, 8, 2, True, 1, False, True),  # one split: the kernel writes the output
        (torch.float32, 4, 2, True, 4, True, False),  # rows in the grid's fastest dimension
    ],
)
def test_decode_rope_equals_rotary_kernel_then_decode(
    dtype, num_heads, num_kv_heads, has_norm, max_num_splits, fused_reduce, heads_first
):
    """decode_attention_rope (the "decode_fused_rope" experiment) against qk_norm_rope_store_kv
    followed by decode_attention on the same inputs: the cache after the call and the output are
    the same bits. The new token sits inside its last split (70: splits of 32), alone in it (33),
    at its end (48), in a one-token row (1); a padding row (seq_len 0, slot -1) writes nothing and
    attends to nothing; rows are taken longest first."""
    from minivllm.kernels.paged_decode import decode_attention_rope
    from minivllm.kernels.qk_norm_rope import qk_norm_rope_store_kv

    seq_lens = [70, 0, 33, 1, 48]
    case, k_cache, v_cache, lens, block_tables = _rope_case(
        seq_lens, num_heads, num_kv_heads, dtype, has_norm
    )
    order = torch.argsort(lens.cpu(), descending=True, stable=True).to(torch.int32).to(DEVICE)
    kw = {"max_num_splits": max_num_splits, "min_partition": 16, "block_n": 16}
    kw.update(row_order=order, fused_reduce=fused_reduce)
    eps = {"q_eps": 1e-6, "k_eps": 1e-5}
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    q = qk_norm_rope_store_kv(
        case["q"],
        case["k"],
        case["v"],
        case["positions"],
        case["cos_cache"],
        case["sin_cache"],
        expect_k,
        expect_v,
        case["slot_mapping"],
        case["q_weight"],
        case["k_weight"],
        **eps,
    )
    expect = _decode_attention(
        q, expect_k, expect_v, lens, block_tables, 0.3, heads_first=heads_first, **kw
    )
    for _ in range(2):  # a second call (a graph replay) finds the counters at zero again
        got_k, got_v = k_cache.clone(), v_cache.clone()
        out = poison_like(case["q"].contiguous())
        ret = decode_attention_rope(
            case["q"],
            case["k"],
            case["v"],
            case["positions"],
            case["cos_cache"],
            case["sin_cache"],
            got_k,
            got_v,
            case["slot_mapping"],
            lens,
            block_tables,
            0.3,
            case["q_weight"],
            case["k_weight"],
            out=out,
            heads_first=heads_first,
            **eps,
            **kw,
        )
        assert ret is out
        assert torch.equal(got_k.nan_to_num(7.0), expect_k.nan_to_num(7.0))
        assert torch.equal(got_v.nan_to_num(7.0), expect_v.nan_to_num(7.0))
        assert not expect_k.isnan().any()  # every NaN slot was a new token's
        assert torch.equal(out, expect)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
