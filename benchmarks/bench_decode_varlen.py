"""Paged decode over mixed context lengths, as in the throughput workload (contexts of 100 to
2048 tokens side by side): GB/s of KV read per launch configuration, with rows in random order
and sorted longest first (the tail of a single-split grid is its longest rows), or in random order
with the kernel's `row_order` taking them longest first (what the engine does). Also a probe
kernel with the decode kernel's K/V loads and no attention math ("gather-read", with the rows and
with the KV heads ("hf") in the grid's fastest dimension), and an optional head-major cache layout
(`--layout hnd`, passed as a permuted view).

Qwen3-0.6B head shape (16 query heads, 8 KV heads, head_dim 128), bf16, block size 16, shuffled
block tables (as wide as the longest row, or --table-width tokens as a server's max_model_len
makes them); each variant timed as a CUDA-graph replay of 10 calls.

    python benchmarks/bench_decode_varlen.py --batch 256 128 64
    python benchmarks/bench_decode_varlen.py --batch 16 32 --lo 500 --hi 1100 --table-width 32768 \
        --variants default grid4 grid8 grid16
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl
from bench_common import copy_bandwidth_gbs, graph_replay_us, read_bandwidth_gbs
from minivllm.kernels.block_table import tile_row_offsets
from minivllm.kernels.paged_decode import _decode_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128
# name -> keyword overrides of _decode_attention
VARIANTS = {
    "default": {},
    "rows first": {"heads_first": False},
    "rows first single": {"heads_first": False, "max_num_splits": 1},
    "w2": {"num_warps": 2},
    "w8": {"num_warps": 8},
    "s1": {"num_stages": 1},
    "n32 s2": {"block_n": 32, "num_stages": 2},
    "n32 w2 s2": {"block_n": 32, "num_warps": 2, "num_stages": 2},
    "n16 s3": {"block_n": 16, "num_stages": 3},
    "n128 s2": {"block_n": 128, "num_stages": 2, "min_partition": 512},
    "n64 w4 s2": {"num_stages": 2},
    "n64 w4 s4": {"num_stages": 4},
    "n32 w4 s3": {"block_n": 32, "min_partition": 256},
    "n32 w2 s4": {"block_n": 32, "num_warps": 2, "num_stages": 4, "min_partition": 256},
    "n128 w8 s3": {"block_n": 128, "num_warps": 8, "min_partition": 512},
    "n64 w8 s3": {"num_warps": 8},
    "single": {"max_num_splits": 1},
    "splits<=2 p256": {"max_num_splits": 2, "min_partition": 256},
    "splits<=2 p512": {"max_num_splits": 2, "min_partition": 512},
    "splits<=3 p256": {"max_num_splits": 3, "min_partition": 256},
    "splits<=4 p256": {"max_num_splits": 4, "min_partition": 256},
    "splits<=8 p256": {"max_num_splits": 8, "min_partition": 256},
    "p128": {"min_partition": 128},
    "p64": {"min_partition": 64},
    "n32 p64": {"block_n": 32, "min_partition": 64},
    "n32 p32": {"block_n": 32, "min_partition": 32},
    # The default split with the grid capped at N split programs per SM (each program looping
    # over every n-th split), as _default_split does for 1-8 requests: a wide block table
    # (--table-width) otherwise launches a program per split it could need, most of which exit.
    "grid4": {"grid_per_sm": 4},
    "grid8": {"grid_per_sm": 8},
    "grid16": {"grid_per_sm": 16},
}


@triton.jit
def _gather_read_kernel(
    k_ptr,
    v_ptr,
    seq_lens_ptr,
    bt_ptr,
    out_ptr,
    stride_block,
    stride_tok,
    stride_head,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_FIRST: tl.constexpr = False,
):
    # The decode kernel's K/V loads (same tiles, same block-table lookup) with a plain sum for
    # compute: what the access pattern alone allows.
    b = tl.program_id(1 if HEADS_FIRST else 0)
    head = tl.program_id(0 if HEADS_FIRST else 1)
    head_off = head.to(tl.int64) * stride_head
    seq_len = tl.load(seq_lens_ptr + b)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for tile_start in range(0, seq_len, BLOCK_N):
        rows = tile_row_offsets(
            bt_row, tile_start, seq_len, stride_block, stride_tok, BLOCK_SIZE, BLOCK_N, True, True
        )
        mask = (tile_start + offs_n < seq_len)[:, None]
        off = head_off + rows[:, None] + offs_d[None, :]
        acc += tl.load(k_ptr + off, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(v_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * 8 + head, tl.sum(tl.sum(acc, 1), 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 128, 64])
    ap.add_argument("--lo", type=int, default=100)
    ap.add_argument("--hi", type=int, default=2048)
    ap.add_argument("--block-size", type=int, nargs="+", default=[16])
    ap.add_argument(
        "--table-width",
        type=int,
        default=0,
        metavar="TOKENS",
        help="block-table width in tokens, as a server's max_model_len sets it (default: the "
        "longest row's)",
    )
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument(
        "--layout",
        nargs="+",
        default=["nhd"],
        choices=["nhd", "hnd"],
        help="cache layout: nhd = [blocks, block_size, kv_heads, dim] (the engine's), "
        "hnd = [blocks, kv_heads, block_size, dim] (passed as a permuted view)",
    )
    args = ap.parse_args()
    variants = {k: VARIANTS[k] for k in args.variants}
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)
    dtype = torch.bfloat16
    print(
        f"copy bandwidth {copy_bandwidth_gbs():,.0f} GB/s (read + written), "
        f"read-only {read_bandwidth_gbs():,.0f} GB/s"
    )
    print(
        f"{'layout':<6} {'block':>5} {'batch':>5} {'order':<8}{'gather-read':>12}{'gather hf':>10}"
        + "".join(f"{v:>16}" for v in variants)
        + "   (GB/s)"
    )
    for layout, block, batch in itertools.product(args.layout, args.block_size, args.batch):
        lens = torch.randint(args.lo, args.hi + 1, (batch,))
        blocks = (lens + block - 1) // block
        total = int(blocks.sum())
        if layout == "nhd":
            shape = (total, block, NUM_KV_HEADS, HEAD_DIM)
            k_cache = torch.randn(shape, device="cuda", dtype=dtype)
            v_cache = torch.randn(shape, device="cuda", dtype=dtype)
        else:
            shape = (total, NUM_KV_HEADS, block, HEAD_DIM)
            k_cache = torch.randn(shape, device="cuda", dtype=dtype).permute(0, 2, 1, 3)
            v_cache = torch.randn(shape, device="cuda", dtype=dtype).permute(0, 2, 1, 3)
        perm = torch.randperm(total).to(torch.int32)
        width = max(int(blocks.max()), -(-args.table_width // block))
        bt = torch.full((batch, width), -1, dtype=torch.int32)
        pos = 0
        for b in range(batch):
            n = int(blocks[b])
            bt[b, :n] = perm[pos : pos + n]
            pos += n
        q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=dtype)
        kv_bytes = 2 * int(lens.sum()) * NUM_KV_HEADS * HEAD_DIM * 2
        for order in ("random", "longest", "row_order"):
            # longest: the rows themselves sorted; row_order: random rows, the kernel's programs
            # taking them longest first (what the engine's decode graph steps do)
            longest = order == "longest"
            idx = torch.argsort(lens, descending=True) if longest else torch.arange(batch)
            seq_lens = lens[idx].to(torch.int32).cuda()
            tables = bt[idx].contiguous().cuda()
            row_order = (
                torch.argsort(seq_lens, descending=True, stable=True).to(torch.int32)
                if order == "row_order"
                else None
            )
            out = torch.empty_like(q)
            ref = _decode_attention(q, k_cache, v_cache, seq_lens, tables, HEAD_DIM**-0.5)
            sums = torch.empty(batch * NUM_KV_HEADS, device="cuda")

            def gather(
                heads_first=False,
                seq_lens=seq_lens,
                tables=tables,
                k=k_cache,
                v=v_cache,
                sums=sums,
                batch=batch,
                block=block,
            ):
                grid = (NUM_KV_HEADS, batch) if heads_first else (batch, NUM_KV_HEADS)
                _gather_read_kernel[grid](
                    k,
                    v,
                    seq_lens,
                    tables,
                    sums,
                    k.stride(0),
                    k.stride(1),
                    k.stride(2),
                    tables.stride(0),
                    BLOCK_SIZE=block,
                    BLOCK_N=64,
                    HEAD_DIM=HEAD_DIM,
                    HEADS_FIRST=heads_first,
                    num_warps=4,
                    num_stages=3,
                )

            row = [
                kv_bytes / graph_replay_us(gather) / 1e3,
                kv_bytes / graph_replay_us(lambda: gather(heads_first=True)) / 1e3,
            ]
            for kw in variants.values():
                if "grid_per_sm" in kw:
                    kw = {
                        "grid_splits": triton.cdiv(
                            kw["grid_per_sm"] * num_sms, batch * NUM_KV_HEADS
                        )
                    }

                def call(
                    kw=kw,
                    seq_lens=seq_lens,
                    tables=tables,
                    out=out,
                    q=q,
                    k=k_cache,
                    v=v_cache,
                    row_order=row_order,
                ):
                    _decode_attention(
                        q,
                        k,
                        v,
                        seq_lens,
                        tables,
                        HEAD_DIM**-0.5,
                        out=out,
                        row_order=row_order,
                        **kw,
                    )

                call()
                torch.cuda.synchronize()
                err = (out.float() - ref.float()).abs().max().item()
                assert err < 2e-2, (kw, err)
                row.append(kv_bytes / graph_replay_us(call) / 1e3)
            print(
                f"{layout:<6} {block:>5} {batch:>5} {order:<8}{row[0]:>12,.0f}{row[1]:>10,.0f}"
                + "".join(f"{v:>16,.0f}" for v in row[2:])
            )


if __name__ == "__main__":
    main()
