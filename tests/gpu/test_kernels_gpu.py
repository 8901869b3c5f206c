"""Triton attention kernels on the GPU: bf16 at real sizes (Qwen3-0.6B: 16 query heads, 8 KV heads,
head_dim 128), with the launchers' default tile configurations, against the float32 torch reference.
Also: a KV pool whose block offsets pass 2^31 elements, decode in one split (large batches: no
reduce), and decode replayed from a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from minivllm.kernels import reference

pytestmark = pytest.mark.gpu

# bf16 inputs, float32 reference: P is rounded to bf16 before the P @ V dot.
TOL = {"atol": 2e-2, "rtol": 2e-2}
FP16_TOL = {"atol": 3e-3, "rtol": 3e-3}


def _paged(seq_lens, num_kv_heads, head_dim, block_size, dtype, num_blocks=None, seed=0):
    """Random caches and shuffled block tables; with num_blocks, blocks come from the pool's top."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    needed = sum(blocks_per_seq)
    total = num_blocks or needed + 4
    shape = (total, block_size, num_kv_heads, head_dim)
    if num_blocks is None:
        k_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
        v_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    else:  # a huge pool: fill only the blocks in use, and block 0 (where -1 padding is clamped)
        k_cache = torch.empty(shape, dtype=dtype, device="cuda")
        v_cache = torch.empty(shape, dtype=dtype, device="cuda")
        k_cache[0] = 0
        v_cache[0] = 0
    ids = (total - 1 - torch.randperm(needed + 2, generator=gen, device="cuda"))[:needed]
    k_cache[ids] = torch.randn((needed, *shape[1:]), generator=gen, device="cuda").to(dtype)
    v_cache[ids] = torch.randn((needed, *shape[1:]), generator=gen, device="cuda").to(dtype)
    block_tables = torch.full(
        (len(seq_lens), max(blocks_per_seq)), -1, dtype=torch.int32, device="cuda"
    )
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = ids[used : used + n].to(torch.int32)
        used += n
    return k_cache, v_cache, block_tables


def _prefill_case(
    prefix_new, num_heads, num_kv_heads, head_dim, block_size, dtype, tol, num_blocks=None
):
    from minivllm.kernels.flash_prefill import prefill_attention

    seq_lens = [p + n for p, n in prefix_new]
    q_lens = [n for _, n in prefix_new]
    k_cache, v_cache, block_tables = _paged(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, num_blocks
    )
    cu = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), num_heads, head_dim, device="cuda").to(dtype)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    prefill_attention(q, k_cache, v_cache, cu, lens, block_tables, scale, max(q_lens), out=out)
    expect = reference.prefill_attention(
        q, k_cache, v_cache, cu, lens, block_tables, scale, max(q_lens)
    )
    torch.testing.assert_close(out, expect, **tol)


def _decode_case(
    seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, tol, num_blocks=None, **kwargs
):
    from minivllm.kernels.paged_decode import decode_attention

    k_cache, v_cache, block_tables = _paged(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, num_blocks
    )
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(seq_lens), num_heads, head_dim, device="cuda").to(dtype)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, lens, block_tables, head_dim**-0.5, out=out, **kwargs)
    expect = reference.decode_attention(q, k_cache, v_cache, lens, block_tables, head_dim**-0.5)
    torch.testing.assert_close(out, expect, **tol)


def _prefix_cases(block_size):
    # (cached prefix, new tokens): 0 / 1 / block_size-1 / block_size / several blocks, ragged;
    # one long prompt spanning many query and key tiles
    return [
        (0, 1000),
        (1, 130),
        (block_size - 1, 77),
        (block_size, 1),
        (3 * block_size + 5, 300),
        (700, 257),
    ]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(16, 16), (16, 8), (16, 4), (16, 2)])
@pytest.mark.parametrize("block_size", [16, 32, 256])
def test_prefill_bf16(num_heads, num_kv_heads, block_size):
    _prefill_case(
        _prefix_cases(block_size), num_heads, num_kv_heads, 128, block_size, torch.bfloat16, TOL
    )


@pytest.mark.parametrize("block_size", [16, 256])
def test_prefill_chunk_over_long_prefix(block_size):
    """Few query tiles (the launcher picks 64-row tiles): chunks over long cached prefixes."""
    _prefill_case([(4096, 512), (1000, 7), (4095, 1)], 16, 8, 128, block_size, torch.bfloat16, TOL)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, TOL), (torch.float16, FP16_TOL)])
def test_prefill_head_dim_64(dtype, tol):
    _prefill_case(_prefix_cases(16), 16, 8, 64, 16, dtype, tol)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(16, 16), (16, 8), (16, 4), (16, 2)])
@pytest.mark.parametrize("block_size", [16, 32, 256])
def test_decode_bf16(num_heads, num_kv_heads, block_size):
    seq_lens = [1, block_size - 1, 0, block_size, block_size + 1, 3000, 9000, 0, 77]
    _decode_case(seq_lens, num_heads, num_kv_heads, 128, block_size, torch.bfloat16, TOL)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, TOL), (torch.float16, FP16_TOL)])
def test_decode_head_dim_64_and_one_long_sequence(dtype, tol):
    _decode_case([32768], 16, 8, 64, 16, dtype, tol)
    _decode_case([5, 32768 + 3], 16, 8, 128, 16, dtype, tol)


@pytest.mark.parametrize("longest_first", [False, True])
@pytest.mark.parametrize("block_size", [16, 256])
def test_decode_single_split_bf16(monkeypatch, block_size, longest_first):
    """256 sequences x 8 KV heads fill an H100 (132 SMs): one split by default, so the main kernel
    writes the output and the reduce is never launched; padding rows (seq_len 0) are zeros. Also
    with the programs taking the rows longest first, as decode graph steps do."""
    from minivllm.kernels import paged_decode

    gen = torch.Generator().manual_seed(block_size)
    seq_lens = torch.randint(1, 3000, (256,), generator=gen)
    seq_lens[[0, 100, 255]] = 0
    max_context = -(-int(seq_lens.max()) // block_size) * block_size
    assert paged_decode._default_split(256, 8, max_context, torch.device("cuda"))[0] == 1
    monkeypatch.setattr(paged_decode, "_paged_decode_reduce_kernel", None)  # must not be needed
    order = torch.argsort(seq_lens, descending=True, stable=True).to(torch.int32).cuda()
    kwargs = {"row_order": order} if longest_first else {}
    _decode_case(seq_lens.tolist(), 16, 8, 128, block_size, torch.bfloat16, TOL, **kwargs)


def test_store_kvcache_bf16():
    from minivllm.kernels.kv_store import store_kvcache

    num_tokens, kvh, d, block_size = 3000, 8, 128, 16
    qkv = torch.randn(num_tokens, (16 + 2 * kvh) * d, device="cuda").to(torch.bfloat16)
    key = qkv[:, 16 * d : (16 + kvh) * d].view(num_tokens, kvh, d)
    value = qkv[:, (16 + kvh) * d :].view(num_tokens, kvh, d)
    k_cache = torch.randn(400, block_size, kvh, d, device="cuda").to(torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(400 * block_size, device="cuda")[:num_tokens]
    slots[::7] = -1
    k_expect, v_expect = k_cache.clone(), v_cache.clone()
    store_kvcache(key, value, k_cache, v_cache, slots.to(torch.int32))
    reference.store_kvcache(key, value, k_expect, v_expect, slots)
    assert torch.equal(k_cache, k_expect) and torch.equal(v_cache, v_expect)


def test_offsets_past_2_to_the_31():
    """block_id * block_stride (16 * 8 * 128 = 16384 elements) passes 2^31 for the top blocks."""
    from minivllm.kernels.kv_store import store_kvcache

    block_size, kvh, d = 16, 8, 128
    num_blocks = (1 << 31) // (block_size * kvh * d) + 64
    if torch.cuda.mem_get_info()[0] < 2 * num_blocks * block_size * kvh * d * 2 + (4 << 30):
        pytest.skip("not enough GPU memory for a 2 x 4 GiB pool")
    _prefill_case(
        [(40, 200), (0, 64)], 16, kvh, d, block_size, torch.bfloat16, TOL, num_blocks=num_blocks
    )
    _decode_case([1000, 33], 16, kvh, d, block_size, torch.bfloat16, TOL, num_blocks=num_blocks)
    _decode_case(
        [1000, 33],
        16,
        kvh,
        d,
        block_size,
        torch.bfloat16,
        TOL,
        num_blocks=num_blocks,
        max_num_splits=1,
    )
    torch.cuda.empty_cache()
    k_cache = torch.zeros(num_blocks, block_size, kvh, d, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(5, kvh, d, device="cuda").to(torch.bfloat16)
    value = torch.randn_like(key)
    slots = torch.tensor(
        [num_blocks * block_size - 1, -1, (num_blocks - 3) * block_size + 2, 0, 7],
        dtype=torch.int64,
        device="cuda",
    )
    store_kvcache(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, kvh, d), v_cache.view(-1, kvh, d)
    for t in (0, 2, 3, 4):
        assert torch.equal(flat_k[slots[t]], key[t]) and torch.equal(flat_v[slots[t]], value[t])
    # The q/k-norm + rotary kernel that writes the cache itself (no norm, position 0: rope is
    # the identity, so the cache must hold key and value exactly).
    from minivllm.kernels.qk_norm_rope import qk_norm_rope_store_kv

    k_cache.zero_()
    v_cache.zero_()
    table = torch.ones(1, d, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(5, 16, d, device="cuda").to(torch.bfloat16)
    positions = torch.zeros(5, dtype=torch.int32, device="cuda")
    qk_norm_rope_store_kv(q, key, value, positions, table, 0 * table, k_cache, v_cache, slots)
    for t in (0, 2, 3, 4):
        assert torch.equal(flat_k[slots[t]], key[t]) and torch.equal(flat_v[slots[t]], value[t])
    assert k_cache.count_nonzero() == key[[0, 2, 3, 4]].count_nonzero()


@pytest.mark.parametrize("batch", [8, 128])  # split-K + reduce; one split (no reduce)
def test_decode_cuda_graph_replay_matches_eager(batch):
    from minivllm.kernels.paged_decode import decode_attention

    num_heads, kvh, d, block_size, max_blocks = 16, 8, 128, 16, 256
    k_cache, v_cache, _ = _paged([max_blocks * block_size], kvh, d, block_size, torch.bfloat16)
    num_blocks = k_cache.shape[0]
    static_q = torch.randn(batch, num_heads, d, device="cuda").to(torch.bfloat16)
    static_lens = torch.zeros(batch, dtype=torch.int32, device="cuda")
    static_tables = torch.full((batch, max_blocks), -1, dtype=torch.int32, device="cuda")
    static_out = torch.empty_like(static_q)
    scale = d**-0.5

    def run():
        decode_attention(
            static_q, k_cache, v_cache, static_lens, static_tables, scale, out=static_out
        )

    static_lens.fill_(1)
    static_tables[:, 0] = 0
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile and warm up before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()

    for trial, lens in enumerate(
        [
            [1, 17, 4096, 0, 300, 2048, 16, 5] * (batch // 8),
            [4000, 0, 0, 1, 2, 3, 1024, 4095] * (batch // 8),
        ]
    ):
        gen = torch.Generator(device="cuda").manual_seed(trial)
        static_q.copy_(torch.randn(static_q.shape, generator=gen, device="cuda"))
        static_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        static_tables.fill_(-1)
        for b, n in enumerate(lens):
            nb = -(-n // block_size)
            static_tables[b, :nb] = torch.randperm(num_blocks, generator=gen, device="cuda")[:nb]
        static_out.fill_(float("nan"))
        graph.replay()
        replayed = static_out.clone()
        eager = decode_attention(static_q, k_cache, v_cache, static_lens, static_tables, scale)
        assert torch.equal(replayed, eager)
        expect = reference.decode_attention(
            static_q, k_cache, v_cache, static_lens, static_tables, scale
        )
        torch.testing.assert_close(replayed, expect, **TOL)


def _counters_zero() -> bool:
    from minivllm.kernels import paged_decode

    key = ("cuda", torch.cuda.current_device())
    return all(b.count_nonzero() == 0 for b in paged_decode._ARRIVAL_COUNTERS.get(key, []))


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_decode_fused_reduce_bf16(monkeypatch, batch):
    """The decode_fused_reduce experiment at Qwen3-0.6B's shape with the default split (several
    splits at these batch sizes): no reduce launch, the two-kernel path's exact output (same merge,
    same order), rows of mixed lengths with padding rows and rows shorter than one partition; the
    arrival counters are zero after each of two calls."""
    from minivllm.kernels import paged_decode

    gen = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1000, 5000, (batch,), generator=gen)
    seq_lens[2::4] = torch.randint(1, 200, (len(seq_lens[2::4]),), generator=gen)
    if batch > 1:
        seq_lens[1] = 0
    seq_lens = seq_lens.tolist()
    k_cache, v_cache, block_tables = _paged(seq_lens, 8, 128, 16, torch.bfloat16, seed=batch)
    max_context = block_tables.shape[1] * 16
    assert paged_decode._default_split(batch, 8, max_context, torch.device("cuda"))[0] > 1
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, 16, 128, device="cuda").to(torch.bfloat16)
    scale = 128**-0.5
    two_kernels = paged_decode.decode_attention(q, k_cache, v_cache, lens, block_tables, scale)
    monkeypatch.setattr(paged_decode, "_paged_decode_reduce_kernel", None)  # must not be needed
    for _ in range(2):
        out = torch.full_like(q, float("nan"))
        paged_decode.decode_attention(
            q, k_cache, v_cache, lens, block_tables, scale, out=out, fused_reduce=True
        )
        torch.cuda.synchronize()
        assert _counters_zero()
        assert torch.equal(out, two_kernels), (out - two_kernels).abs().max()
    expect = reference.decode_attention(q, k_cache, v_cache, lens, block_tables, scale)
    torch.testing.assert_close(out, expect, **TOL)


def test_decode_fused_reduce_cuda_graph_replay():
    """The fused reduce captured once (after an eager warm-up), replayed with two different sets of
    seq_lens and block tables: each replay equals the eager two-kernel path bit for bit, so the
    counters were back at zero for the next replay without a memset in the graph."""
    from minivllm.kernels.paged_decode import decode_attention

    batch, num_heads, kvh, d, block_size, max_blocks = 8, 16, 8, 128, 16, 256
    k_cache, v_cache, _ = _paged([max_blocks * block_size], kvh, d, block_size, torch.bfloat16)
    num_blocks = k_cache.shape[0]
    static_q = torch.randn(batch, num_heads, d, device="cuda").to(torch.bfloat16)
    static_lens = torch.ones(batch, dtype=torch.int32, device="cuda")
    static_tables = torch.zeros((batch, max_blocks), dtype=torch.int32, device="cuda")
    static_out = torch.empty_like(static_q)
    scale = d**-0.5

    def run():
        decode_attention(
            static_q,
            k_cache,
            v_cache,
            static_lens,
            static_tables,
            scale,
            out=static_out,
            fused_reduce=True,
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile, and allocate the counters, before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()

    for trial, lens in enumerate(
        [[1, 17, 4096, 0, 300, 2048, 16, 5], [4000, 0, 0, 1, 2, 3, 1024, 4095]]
    ):
        gen = torch.Generator(device="cuda").manual_seed(trial)
        static_q.copy_(torch.randn(static_q.shape, generator=gen, device="cuda"))
        static_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        static_tables.fill_(-1)
        for b, n in enumerate(lens):
            nb = -(-n // block_size)
            static_tables[b, :nb] = torch.randperm(num_blocks, generator=gen, device="cuda")[:nb]
        for _ in range(2):
            static_out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert _counters_zero()
            eager = decode_attention(static_q, k_cache, v_cache, static_lens, static_tables, scale)
            assert torch.equal(static_out, eager)
        expect = reference.decode_attention(
            static_q, k_cache, v_cache, static_lens, static_tables, scale
        )
        torch.testing.assert_close(static_out, expect, **TOL)


def _prefill_variants(prefix_new, num_heads, num_kv_heads, block_size, **tma_kwargs):
    """The tma variant of the flash prefill kernel (bf16, head_dim 128) against the reference
    and against the default kernel on the same inputs."""
    from minivllm.kernels.flash_prefill import _prefill_attention

    head_dim = 128
    seq_lens = [p + n for p, n in prefix_new]
    q_lens = [n for _, n in prefix_new]
    k_cache, v_cache, block_tables = _paged(
        seq_lens, num_kv_heads, head_dim, block_size, torch.bfloat16
    )
    cu = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), num_heads, head_dim, device="cuda").to(torch.bfloat16)
    args = (q, k_cache, v_cache, cu, lens, block_tables, head_dim**-0.5, max(q_lens))
    out = torch.full_like(q, float("nan"))
    _prefill_attention(*args, out=out, variant="tma", **tma_kwargs)
    torch.testing.assert_close(out, reference.prefill_attention(*args), **TOL)
    torch.testing.assert_close(out, _prefill_attention(*args), **TOL)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(16, 8), (16, 2)])
@pytest.mark.parametrize(
    "block_size,block_n",
    [(16, None), (16, 32), (256, None), (256, 64), (256, 128)],
)
def test_prefill_tma_variant(num_heads, num_kv_heads, block_size, block_n):
    """Q and K/V tiles through tensor descriptors (block_n 32 over 16-token blocks: K/V by
    pointers), launcher default tiles and 128-row tiles, on prompts, chunks over long prefixes
    and one-token queries."""
    from minivllm.kernels.flash_prefill import tma_loads

    probe_q = torch.empty(1, num_heads, 128, dtype=torch.bfloat16, device="cuda")
    probe_cache = torch.empty(4, block_size, num_kv_heads, 128, dtype=torch.bfloat16, device="cuda")
    group = num_heads // num_kv_heads
    kv_tma = block_n is None or block_size % block_n == 0
    assert tma_loads(probe_q, probe_cache, probe_cache, group, block_n or 16) == (True, kv_tma)
    cases = _prefix_cases(block_size) + [(4096, 512), (4095, 1)]
    _prefill_variants(cases, num_heads, num_kv_heads, block_size, block_n=block_n)
    if block_n is not None:
        _prefill_variants(
            cases, num_heads, num_kv_heads, block_size, block_m=128, block_n=block_n, num_warps=8
        )


@pytest.mark.parametrize(
    "block_size,block_n,num_stages",
    [(16, 16, 3), (256, 64, 3), (256, 128, 2)],
)
def test_prefill_tma_warp_specialized(block_size, block_n, num_stages):
    """The tma variant with its key loop warp-specialized (4 warps: Triton 3.6 builds one
    producer and two consumer warp groups; one program per query head), and the same tiles
    unpacked without warp specialization."""
    cases = _prefix_cases(block_size) + [(4096, 512)]
    tiles = {"block_m": 128, "block_n": block_n, "num_warps": 4, "num_stages": num_stages}
    _prefill_variants(cases, 16, 8, block_size, warp_specialize=True, **tiles)
    _prefill_variants(cases, 16, 2, block_size, warp_specialize=True, **tiles)
    _prefill_variants(cases, 16, 8, block_size, pack_gqa=False, **tiles)


@pytest.mark.parametrize("block_size", [16, 256])
def test_prefill_tma_cuda_graph_replay_matches_eager(block_size):
    """A tile-table launch of the tma variant captured in a CUDA graph (its host descriptors are
    captured with the launch) replays to the default kernel's eager output."""
    import numpy as np
    from minivllm.kernels.flash_prefill import (
        _prefill_attention,
        build_tile_table,
        max_tiles,
        tile_config,
    )

    num_heads, num_kv_heads, head_dim, num_tokens = 16, 8, 128, 512
    prefix_new = [(3000, 1), (17, 1), (0, 300), (900, 200), (64, 10)]
    seq_lens = [p + n for p, n in prefix_new]
    k_cache, v_cache, block_tables = _paged(
        seq_lens, num_kv_heads, head_dim, block_size, torch.bfloat16
    )
    q_lens = [n for _, n in prefix_new]
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    group = num_heads // num_kv_heads
    block_m = tile_config(block_size, group, num_kv_heads, num_tokens, torch.device("cuda"))[0]
    tokens_per_tile = block_m // group
    table = np.zeros(max_tiles(num_tokens, len(q_lens), tokens_per_tile), np.int32)
    build_tile_table(qsl, np.array(seq_lens), tokens_per_tile, table)
    tiles = torch.tensor(table, device="cuda")
    q = torch.randn(num_tokens, num_heads, head_dim, device="cuda").to(torch.bfloat16)
    cu = torch.tensor(qsl, dtype=torch.int32, device="cuda")
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    args = (q, k_cache, v_cache, cu, lens, block_tables, head_dim**-0.5, 0)

    def run():
        _prefill_attention(*args, out=out, tiles=tiles, variant="tma")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile and warm up before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    n = int(qsl[-1])
    eager = _prefill_attention(q[:n], k_cache, v_cache, cu, lens, block_tables, head_dim**-0.5, 300)
    torch.testing.assert_close(out[:n], eager, **TOL)


def _rope_step(seq_lens, block_tables, block_size=16, num_heads=16, kvh=8, d=128, seed=0):
    """A bf16 decode step's raw q, k, v (views into one qkv buffer), positions, slots (-1 for a
    padding row), Qwen3's norm weights and a real rotary table."""
    from minivllm.layers.rotary import RotaryEmbedding

    batch = len(seq_lens)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(batch, (num_heads + 2 * kvh) * d, generator=gen, device="cuda")
    q, k, v = qkv.to(torch.bfloat16).split([num_heads * d, kvh * d, kvh * d], dim=-1)
    tables = block_tables.cpu()
    slots = [
        int(tables[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else -1
        for b, n in enumerate(seq_lens)
    ]
    rotary = RotaryEmbedding(d, 8192, 1e6)  # float32 tables, cast as a bf16 model's are
    weights = torch.rand(2, d, generator=gen, device="cuda").add(0.5).to(torch.bfloat16)
    return {
        "q": q.view(batch, num_heads, d),
        "k": k.view(batch, kvh, d),
        "v": v.view(batch, kvh, d),
        "positions": torch.tensor([max(n - 1, 0) for n in seq_lens], device="cuda"),
        "cos_cache": rotary.cos_cache.to("cuda", torch.bfloat16),
        "sin_cache": rotary.sin_cache.to("cuda", torch.bfloat16),
        "slot_mapping": torch.tensor(slots, dtype=torch.int32, device="cuda"),
        "q_weight": weights[0],
        "k_weight": weights[1],
    }


def _rotary_then_decode(step, k_cache, v_cache, lens, block_tables, scale, **kw):
    """Today's path: qk_norm_rope_store_kv, then decode_attention."""
    from minivllm.kernels.paged_decode import decode_attention
    from minivllm.kernels.qk_norm_rope import qk_norm_rope_store_kv

    q = qk_norm_rope_store_kv(
        step["q"],
        step["k"],
        step["v"],
        step["positions"],
        step["cos_cache"],
        step["sin_cache"],
        k_cache,
        v_cache,
        step["slot_mapping"],
        step["q_weight"],
        step["k_weight"],
    )
    return decode_attention(q, k_cache, v_cache, lens, block_tables, scale, **kw)


def _decode_rope(step, k_cache, v_cache, lens, block_tables, scale, **kw):
    from minivllm.kernels.paged_decode import decode_attention_rope

    return decode_attention_rope(
        step["q"],
        step["k"],
        step["v"],
        step["positions"],
        step["cos_cache"],
        step["sin_cache"],
        k_cache,
        v_cache,
        step["slot_mapping"],
        lens,
        block_tables,
        scale,
        step["q_weight"],
        step["k_weight"],
        **kw,
    )


@pytest.mark.parametrize("fused_reduce", [False, True])
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_decode_rope_bf16(batch, fused_reduce):
    """The decode_fused_rope experiment at Qwen3-0.6B's shape with the default split: the cache
    after the call is the rotary kernel's, bit for bit, and the output is the two-kernel path's
    (q normed and rotated by the same code; the new token from registers)."""
    gen = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1000, 5000, (batch,), generator=gen)
    seq_lens[2::4] = torch.randint(1, 200, (len(seq_lens[2::4]),), generator=gen)
    if batch > 1:
        seq_lens[1] = 0
    seq_lens = seq_lens.tolist()
    k_cache, v_cache, block_tables = _paged(seq_lens, 8, 128, 16, torch.bfloat16, seed=batch)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    step = _rope_step(seq_lens, block_tables, seed=batch)
    scale = 128**-0.5
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    expect = _rotary_then_decode(
        step, expect_k, expect_v, lens, block_tables, scale, fused_reduce=fused_reduce
    )
    out = _decode_rope(step, k_cache, v_cache, lens, block_tables, scale, fused_reduce=fused_reduce)
    torch.cuda.synchronize()
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)
    torch.testing.assert_close(out, expect, atol=1e-2, rtol=1e-2)
    if batch > 1:
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_decode_rope_cuda_graph_replay():
    """decode_attention_rope captured once (after an eager warm-up), replayed with two sets of
    rows: each replay's cache writes and output match the eager two-kernel path."""
    batch, kvh, d, block_size, max_blocks = 8, 8, 128, 16, 256
    k_cache, v_cache, _ = _paged([max_blocks * block_size], kvh, d, block_size, torch.bfloat16)
    num_blocks = k_cache.shape[0]
    static_lens = torch.ones(batch, dtype=torch.int32, device="cuda")
    static_tables = torch.zeros((batch, max_blocks), dtype=torch.int32, device="cuda")
    static = _rope_step([1] * batch, static_tables)
    static_qkv = [static[name] for name in ("q", "k", "v", "positions", "slot_mapping")]
    static_out = torch.empty(static["q"].shape, dtype=torch.bfloat16, device="cuda")
    scale = d**-0.5

    def run():
        _decode_rope(static, k_cache, v_cache, static_lens, static_tables, scale, out=static_out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()

    for trial, lens in enumerate(
        [[1, 17, 4096, 0, 300, 2048, 16, 5], [4000, 0, 0, 1, 2, 3, 1024, 4095]]
    ):
        gen = torch.Generator(device="cuda").manual_seed(trial)
        static_tables.fill_(-1)
        for b, n in enumerate(lens):
            nb = -(-n // block_size)
            static_tables[b, :nb] = torch.randperm(num_blocks, generator=gen, device="cuda")[:nb]
        step = _rope_step(lens, static_tables, seed=trial + 1)
        for name, buf in zip(("q", "k", "v", "positions", "slot_mapping"), static_qkv):
            buf.copy_(step[name])
        static_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        expect_k, expect_v = k_cache.clone(), v_cache.clone()
        expect = _rotary_then_decode(step, expect_k, expect_v, static_lens, static_tables, scale)
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)
        torch.testing.assert_close(static_out, expect, atol=1e-2, rtol=1e-2)
