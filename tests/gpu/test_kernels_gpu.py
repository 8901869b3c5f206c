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
    from minivllm.kernels import decode_split, paged_decode

    gen = torch.Generator().manual_seed(block_size)
    seq_lens = torch.randint(1, 3000, (256,), generator=gen)
    seq_lens[[0, 100, 255]] = 0
    max_context = -(-int(seq_lens.max()) // block_size) * block_size
    assert decode_split._default_split(256, 8, max_context, torch.device("cuda"))[0] == 1
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


@pytest.mark.parametrize("batch", [1, 8, 128])  # 64-token splits; 256-token splits; one split
def test_decode_early_loads_read_the_key_written_just_before(batch):
    """With early_loads the decode kernel reads its first key tile before its PDL wait, all but
    the row's newest key, which the q/k-norm + rotary kernel launched just before it writes.
    Replayed from a CUDA graph with a new token's q, k and v each time, its output is the plain
    kernel's bit for bit (a newest key read too early would carry the last replay's value)."""
    from minivllm.kernels.paged_decode import _decode_attention
    from minivllm.kernels.qk_norm_rope import qk_norm_rope_store_kv

    num_heads, kvh, d, block_size = 16, 8, 128, 16
    seq_lens = ([1, 17, 64, 65, 300, 576, 1000, 2048] * 16)[: max(batch, 1)]
    if batch == 1:
        seq_lens = [576]
    k_cache, v_cache, tables = _paged(seq_lens, kvh, d, block_size, torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    positions = lens - 1
    slots = tables.gather(1, (positions // block_size).long()[:, None])[:, 0] * block_size
    slots = slots + positions % block_size
    table = torch.randn(max(seq_lens), d, device="cuda").to(torch.bfloat16)
    q_in = torch.empty(batch, num_heads, d, device="cuda", dtype=torch.bfloat16)
    k_in = torch.empty(batch, kvh, d, device="cuda", dtype=torch.bfloat16)
    v_in = torch.empty_like(k_in)
    out = torch.empty_like(q_in)
    order = torch.argsort(lens, descending=True, stable=True).to(torch.int32)

    def step(early):
        q = qk_norm_rope_store_kv(
            q_in, k_in, v_in, positions, table, table, k_cache, v_cache, slots
        )
        return _decode_attention(
            q, k_cache, v_cache, lens, tables, d**-0.5, out=out, row_order=order, early_loads=early
        )

    for x in (q_in, k_in, v_in):
        x.normal_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(True)  # compile and warm up before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(True)
    for trial in range(20):
        gen = torch.Generator(device="cuda").manual_seed(trial)
        for x in (q_in, k_in, v_in):
            x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        early = out.clone()
        assert torch.equal(early, step(False)), trial
