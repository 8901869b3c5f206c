"""Triton paged flash prefill against the torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, make_paged_batch, poison_like, tolerances

from minivllm.kernels import reference
from minivllm.kernels.flash_prefill import _prefill_attention, prefill_attention


def _check(
    prefix_new,
    num_heads,
    num_kv_heads,
    head_dim,
    block_size,
    dtype,
    q=None,
    launch=prefill_attention,
    **kwargs,
):
    seq_lens = [p + n for p, n in prefix_new]
    q_lens = [n for _, n in prefix_new]
    k_cache, v_cache, block_tables = make_paged_batch(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=sum(seq_lens)
    )
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32).to(DEVICE)
    if q is None:
        gen = torch.Generator().manual_seed(num_heads * head_dim)
        q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = poison_like(q)
    ret = launch(q, k_cache, v_cache, cu, lens, block_tables, scale, max(q_lens), out=out, **kwargs)
    assert ret is out
    expect = reference.prefill_attention(
        q, k_cache, v_cache, cu, lens, block_tables, scale, max(q_lens)
    )
    torch.testing.assert_close(out, expect, **tolerances(dtype))


def _prefix_cases(block_size):
    # (cached prefix, new tokens): prefix 0 / 1 / block_size-1 / block_size / several blocks,
    # ragged new-token counts (1 = a chunk of one token, longer than a query tile)
    return [(0, 37), (1, 5), (block_size - 1, 20), (block_size, 1), (2 * block_size + 3, 40)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (16, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size,block_n", [(16, 32), (32, 32), (256, 64)])
def test_prefill(dtype, num_heads, num_kv_heads, head_dim, block_size, block_n):
    _check(
        _prefix_cases(block_size),
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        dtype,
        block_m=32,
        block_n=block_n,
        num_warps=4,
        num_stages=1,
    )


@pytest.mark.parametrize(
    "block_m,block_n,block_size,select_lookup",
    [
        (16, 16, 16, True),
        (64, 16, 32, True),
        (128, 64, 16, True),
        (128, 64, 16, False),
        (32, 128, 16, False),
    ],
)
def test_prefill_tiles(block_m, block_n, block_size, select_lookup):
    """Tile shapes: BLOCK_N equal to, smaller than and larger than the cache block (block ids by
    per-block selects or by a per-row gather)."""
    _check(
        [(0, 70), (block_size + 7, 33), (5, 3)],
        8,
        2,
        32,
        block_size,
        torch.float32,
        launch=_prefill_attention,
        block_m=block_m,
        block_n=block_n,
        select_lookup=select_lookup,
    )


def test_prefill_group_not_power_of_two():
    """GQA 3: a tile holds block_m // 3 tokens and leaves its last rows empty."""
    _check([(0, 20), (9, 11)], 6, 2, 32, 16, torch.float32, block_m=16, block_n=16)


def test_prefill_strided_query_and_default_config():
    prefix_new = [(3, 21), (40, 9)]
    qkv = torch.randn(30, 12 * 32, device=DEVICE)
    q = qkv[:, : 8 * 32].view(30, 8, 32)
    _check(prefix_new, 8, 2, 32, 16, torch.float32, q=q)


def test_chunked_prefill_matches_one_pass():
    """Two chunks of one prompt (the second over the first as prefix) equal one full pass."""
    k_cache, v_cache, block_tables = make_paged_batch([50], 2, 32, 16, torch.float32)
    q = torch.randn(50, 4, 32, device=DEVICE)
    lens_full = torch.tensor([50], dtype=torch.int32, device=DEVICE)
    full = prefill_attention(
        q,
        k_cache,
        v_cache,
        torch.tensor([0, 50], dtype=torch.int32, device=DEVICE),
        lens_full,
        block_tables,
        0.2,
        50,
        block_m=16,
        block_n=16,
    )
    first = prefill_attention(
        q[:23],
        k_cache,
        v_cache,
        torch.tensor([0, 23], dtype=torch.int32, device=DEVICE),
        torch.tensor([23], dtype=torch.int32, device=DEVICE),
        block_tables,
        0.2,
        23,
        block_m=16,
        block_n=16,
    )
    second = prefill_attention(
        q[23:],
        k_cache,
        v_cache,
        torch.tensor([0, 27], dtype=torch.int32, device=DEVICE),
        lens_full,
        block_tables,
        0.2,
        27,
        block_m=16,
        block_n=16,
    )
    torch.testing.assert_close(torch.cat([first, second]), full, atol=1e-5, rtol=1e-5)


def _tile_table(prefix_new, tokens_per_tile, extra=5):
    import numpy as np

    from minivllm.kernels.flash_prefill import build_tile_table, max_tiles

    q_lens = [n for _, n in prefix_new]
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
    seq_lens = np.array([p + n for p, n in prefix_new], dtype=np.int64)
    table = np.zeros(max_tiles(int(qsl[-1]), len(q_lens), tokens_per_tile) + extra, np.int32)
    n = build_tile_table(qsl, seq_lens, tokens_per_tile, table)
    return table, n


@pytest.mark.parametrize("block_m", [16, 64])
def test_prefill_with_a_tile_table_covers_decodes_and_chunks(block_m):
    """The CUDA-graph launch: a fixed grid over a tile table (with unused -1 entries) runs
    decode rows (one-token queries over a long context) beside chunks and whole prompts."""
    from minivllm.kernels.flash_prefill import tile_config

    prefix_new = [(90, 1), (17, 1), (0, 45), (33, 20), (64, 1)]
    group, kv_heads = 2, 2
    assert tile_config(16, group, kv_heads, 67, torch.device(DEVICE))[0] % group == 0
    table, n = _tile_table(prefix_new, block_m // group)
    tiles = torch.tensor(table, device=DEVICE)
    assert n < tiles.shape[0] and (table[n:] == -1).all()
    _check(prefix_new, 4, kv_heads, 32, 16, torch.float32, block_m=block_m, block_n=16, tiles=tiles)


def test_tile_table_order_and_bounds():
    """Heaviest tiles (most keys) first, every (row, tile) exactly once, -1 after; a table too
    small is a ValueError, not a silent truncation."""
    import numpy as np

    from minivllm.kernels.flash_prefill import build_tile_table

    table, n = _tile_table([(90, 1), (0, 70), (5, 0)], 32)
    entries = [(int(e) >> 16, int(e) & 0xFFFF) for e in table[:n]]
    assert sorted(entries) == [(0, 0), (1, 0), (1, 1), (1, 2)]
    assert entries[0] == (0, 0)  # 91 keys
    assert entries[1] == (1, 2)  # 70 keys, then 64, then 32
    assert entries[2:] == [(1, 1), (1, 0)]
    with pytest.raises(ValueError, match="tile table"):
        build_tile_table(np.array([0, 70]), np.array([70]), 32, np.zeros(2, np.int32))
