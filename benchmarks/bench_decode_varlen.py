"""Paged decode over mixed context lengths, as in the throughput workload (contexts of 100 to
2048 tokens side by side): GB/s of KV read per launch configuration, with rows in random order
and sorted longest first (the tail of a single-split grid is its longest rows).

Qwen3-0.6B head shape (16 query heads, 8 KV heads, head_dim 128), bf16, block size 16, shuffled
block tables; each variant timed as a CUDA-graph replay of 10 calls.

    python benchmarks/bench_decode_varlen.py --batch 256 128 64
"""

from __future__ import annotations

import argparse
import itertools

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import graph_replay_us  # noqa: E402

from minivllm.kernels.paged_decode import decode_attention  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128
# name -> keyword overrides of decode_attention
VARIANTS = {
    "default": {},
    "n64 w4 s2": {"num_stages": 2},
    "n64 w4 s4": {"num_stages": 4},
    "n32 w4 s3": {"block_n": 32, "min_partition": 256},
    "n32 w2 s4": {"block_n": 32, "num_warps": 2, "num_stages": 4, "min_partition": 256},
    "n128 w8 s3": {"block_n": 128, "num_warps": 8, "min_partition": 512},
    "n64 w8 s3": {"num_warps": 8},
    "splits<=2 p512": {"max_num_splits": 2, "min_partition": 512},
    "splits<=4 p256": {"max_num_splits": 4, "min_partition": 256},
    "splits<=8 p256": {"max_num_splits": 8, "min_partition": 256},
}


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # Each program streams BLOCK * 8 elements and keeps one partial sum: a read-only ceiling.
    base = tl.program_id(0).to(tl.int64) * BLOCK * 8
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(8):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 128, 64])
    ap.add_argument("--lo", type=int, default=100)
    ap.add_argument("--hi", type=int, default=2048)
    ap.add_argument("--block-size", type=int, nargs="+", default=[16])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = ap.parse_args()
    variants = {k: VARIANTS[k] for k in args.variants}
    torch.manual_seed(0)
    dtype = torch.bfloat16
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_us = graph_replay_us(lambda: dst.copy_(src), reps=3)
    print(f"copy bandwidth {2 * (1 << 30) / copy_us / 1e3:,.0f} GB/s (read + written)")
    src.resize_(0)
    dst.resize_(0)
    x = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    sums = torch.empty(triton.cdiv(x.numel(), 4096 * 8), device="cuda")
    read_us = graph_replay_us(lambda: _read_kernel[(sums.numel(),)](x, sums, x.numel(), BLOCK=4096),
                        reps=3)
    print(f"read-only bandwidth {2 * x.numel() / read_us / 1e3:,.0f} GB/s")
    x.resize_(0)
    print(f"{'block':>5} {'batch':>5} {'order':<8}" + "".join(f"{v:>16}" for v in variants)
          + "   (GB/s)")
    for block, batch in itertools.product(args.block_size, args.batch):
        lens = torch.randint(args.lo, args.hi + 1, (batch,))
        blocks = (lens + block - 1) // block
        total = int(blocks.sum())
        shape = (total, block, NUM_KV_HEADS, HEAD_DIM)
        k_cache = torch.randn(shape, device="cuda", dtype=dtype)
        v_cache = torch.randn(shape, device="cuda", dtype=dtype)
        perm = torch.randperm(total).to(torch.int32)
        width = int(blocks.max())
        bt = torch.full((batch, width), -1, dtype=torch.int32)
        pos = 0
        for b in range(batch):
            n = int(blocks[b])
            bt[b, :n] = perm[pos:pos + n]
            pos += n
        q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=dtype)
        kv_bytes = 2 * int(lens.sum()) * NUM_KV_HEADS * HEAD_DIM * 2
        for order in ("random", "longest"):
            longest = order == "longest"
            idx = torch.argsort(lens, descending=True) if longest else torch.arange(batch)
            seq_lens = lens[idx].to(torch.int32).cuda()
            tables = bt[idx].contiguous().cuda()
            out = torch.empty_like(q)
            ref = decode_attention(q, k_cache, v_cache, seq_lens, tables, HEAD_DIM**-0.5)
            row = []
            for kw in variants.values():
                def call(kw=kw, seq_lens=seq_lens, tables=tables, out=out, q=q, k=k_cache,
                         v=v_cache):
                    decode_attention(q, k, v, seq_lens, tables, HEAD_DIM**-0.5, out=out, **kw)
                call()
                torch.cuda.synchronize()
                err = (out.float() - ref.float()).abs().max().item()
                assert err < 2e-2, (kw, err)
                row.append(kv_bytes / graph_replay_us(call) / 1e3)
            print(f"{block:>5} {batch:>5} {order:<8}" + "".join(f"{v:>16,.0f}" for v in row))


if __name__ == "__main__":
    main()
