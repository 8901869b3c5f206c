"""The plain-torch references against a token-by-token oracle (they are the oracle for the kernels
and the CPU attention backend, so they are checked independently)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import make_paged_batch, naive_attention

from minivllm.kernels import reference

TOL = dict(atol=2e-5, rtol=2e-5)  # float32 throughout


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (8, 2)])
def test_prefill_reference(block_size, num_heads, num_kv_heads):
    head_dim = 16
    # (prefix, new): no prefix, 1, block_size-1, block_size, several blocks; ragged new counts
    prefix_new = [(0, 7), (1, 5), (block_size - 1, 3), (block_size, 1), (3 * block_size + 2, 9)]
    seq_lens = [p + n for p, n in prefix_new]
    k_cache, v_cache, block_tables = make_paged_batch(
        seq_lens, num_kv_heads, head_dim, block_size, torch.float32, device="cpu"
    )
    q_lens = [n for _, n in prefix_new]
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), num_heads, head_dim)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    ret = reference.prefill_attention(
        q,
        k_cache,
        v_cache,
        cu,
        torch.tensor(seq_lens, dtype=torch.int32),
        block_tables,
        scale,
        max(q_lens),
        out=out,
    )
    assert ret is out
    for b, seq_len in enumerate(seq_lens):
        s, e = int(cu[b]), int(cu[b + 1])
        expect = naive_attention(q[s:e], k_cache, v_cache, block_tables[b].tolist(), seq_len, scale)
        torch.testing.assert_close(out[s:e], expect, **TOL)


def test_prefill_reference_query_chunks(monkeypatch):
    """Long sequences are processed in query chunks; the chunk edges must not change the result."""
    monkeypatch.setattr(reference, "_MAX_SCORE_ELEMENTS", 4 * 40 * 7)
    k_cache, v_cache, block_tables = make_paged_batch([40], 2, 8, 8, torch.float32, device="cpu")
    q = torch.randn(30, 4, 8)
    out = reference.prefill_attention(
        q,
        k_cache,
        v_cache,
        torch.tensor([0, 30], dtype=torch.int32),
        torch.tensor([40], dtype=torch.int32),
        block_tables,
        0.3,
        30,
    )
    expect = naive_attention(q, k_cache, v_cache, block_tables[0].tolist(), 40, 0.3)
    torch.testing.assert_close(out, expect, **TOL)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (8, 1)])
def test_decode_reference(block_size, num_heads, num_kv_heads):
    head_dim = 16
    seq_lens = [1, block_size - 1, block_size, block_size + 1, 5 * block_size + 3, 0]
    k_cache, v_cache, block_tables = make_paged_batch(
        seq_lens, num_kv_heads, head_dim, block_size, torch.float32, device="cpu"
    )
    q = torch.randn(len(seq_lens), num_heads, head_dim)
    out = torch.full_like(q, float("nan"))
    reference.decode_attention(
        q, k_cache, v_cache, torch.tensor(seq_lens, dtype=torch.int32), block_tables, 0.25, out=out
    )
    for b, seq_len in enumerate(seq_lens):
        if seq_len == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        table = block_tables[b].tolist()
        expect = naive_attention(q[b : b + 1], k_cache, v_cache, table, seq_len, 0.25)
        torch.testing.assert_close(out[b], expect[0], **TOL)


def test_store_reference_skips_negative_slots():
    num_blocks, block_size, kvh, d = 4, 4, 2, 8
    k_cache = torch.full((num_blocks, block_size, kvh, d), -7.0)
    v_cache = torch.full((num_blocks, block_size, kvh, d), -7.0)
    key, value = torch.randn(5, kvh, d), torch.randn(5, kvh, d)
    slots = torch.tensor([13, -1, 2, 7, -1], dtype=torch.int32)
    reference.store_kvcache(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, kvh, d), v_cache.view(-1, kvh, d)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], key[t]) and torch.equal(flat_v[slot], value[t])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[[13, 2, 7]] = False
    assert (flat_k[untouched] == -7.0).all() and (flat_v[untouched] == -7.0).all()
