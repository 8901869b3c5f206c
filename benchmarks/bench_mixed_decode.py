"""What do decode rows cost inside a step with prefill?

A step replayed from a mixed CUDA graph runs every row through the flash prefill kernel, a decode
being a one-token query: one tile of block_m packed query rows (GROUP of them used) that reads
the row's whole context. A decode-only step runs the same rows through the paged decode kernel
(16-row tiles, split over the context). Same rows, same KV, three launches:
  decode         kernels/paged_decode.py, rows longest first (a decode-only graph step)
  prefill/graph  kernels/flash_prefill.py through a tile table, with the tile configuration of a
                 mixed graph of --graph-tokens tokens (what a mixed step's decode rows run)
  prefill/eager  the prefill kernel's own grid for one-token queries (no tile table)
Qwen3-0.6B's heads (16 query, 8 KV, head_dim 128), bf16, contexts uniform --lo..--hi in
shuffled 16-token blocks; microseconds per call from a CUDA graph of 10 calls, and GB/s of KV.
Each output is checked against the decode kernel's. --smoke: a few short rows on the CPU under
TRITON_INTERPRET=1 (float16), a check of the script.

    python benchmarks/bench_mixed_decode.py [--rows 16 64 128 256] [--lo 500 --hi 1100]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from bench_common import DEVICE, check_close, graph_replay_us, print_table
from minivllm.kernels.flash_prefill import (
    build_tile_table,
    max_tiles,
    prefill_attention,
    tile_config,
)
from minivllm.kernels.paged_decode import decode_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 128, 16


def paged_rows(lens: np.ndarray, dtype: torch.dtype, gen: torch.Generator):
    """A KV cache holding each row's context in shuffled blocks, and the rows' block tables."""
    blocks = -(-lens // BLOCK_SIZE)
    total = int(blocks.sum())
    shape = (total, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device=DEVICE, dtype=dtype, generator=gen)
    v_cache = torch.randn(shape, device=DEVICE, dtype=dtype, generator=gen)
    perm = torch.randperm(total, device=DEVICE, generator=gen).to(torch.int32)
    tables = torch.full((len(lens), int(blocks.max())), -1, dtype=torch.int32, device=DEVICE)
    first = np.cumsum(blocks) - blocks
    for row, (start, n) in enumerate(zip(first, blocks)):
        tables[row, :n] = perm[start : start + n]
    return k_cache, v_cache, tables


def bench_rows(rows: int, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, float]:
    gen = torch.Generator(device=DEVICE).manual_seed(rows)
    lens = np.random.default_rng(rows).integers(args.lo, args.hi + 1, rows)
    k_cache, v_cache, tables = paged_rows(lens, dtype, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    cu_seqlens = torch.arange(rows + 1, dtype=torch.int32, device=DEVICE)
    scale = HEAD_DIM**-0.5
    # The graph's query buffer holds --graph-tokens tokens; the decode rows come first.
    q_graph = torch.randn(
        args.graph_tokens, NUM_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype, generator=gen
    )
    q = q_graph[:rows]
    out_decode, out_eager = torch.empty_like(q), torch.empty_like(q)
    out_graph = torch.empty_like(q_graph)
    row_order = torch.argsort(seq_lens, descending=True, stable=True).to(torch.int32)

    group = NUM_HEADS // NUM_KV_HEADS
    block_m = tile_config(BLOCK_SIZE, group, NUM_KV_HEADS, args.graph_tokens, q.device)[0]
    tokens_per_tile = block_m // group
    table = np.empty(max_tiles(args.graph_tokens, args.max_num_seqs, tokens_per_tile), np.int32)
    build_tile_table(np.arange(rows + 1), lens, tokens_per_tile, table)
    tiles = torch.from_numpy(table).to(DEVICE)

    calls = {
        "decode": lambda: decode_attention(
            q, k_cache, v_cache, seq_lens, tables, scale, out=out_decode, row_order=row_order
        ),
        "prefill/graph": lambda: prefill_attention(
            q_graph,
            k_cache,
            v_cache,
            cu_seqlens,
            seq_lens,
            tables,
            scale,
            0,
            out=out_graph,
            tiles=tiles,
        ),
        "prefill/eager": lambda: prefill_attention(
            q, k_cache, v_cache, cu_seqlens, seq_lens, tables, scale, 1, out=out_eager
        ),
    }
    outputs = {"decode": out_decode, "prefill/graph": out_graph[:rows], "prefill/eager": out_eager}
    kv_bytes = 2 * int(lens.sum()) * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()
    result: dict[str, float] = {"rows": rows, "mean context": float(lens.mean())}
    for name, call in calls.items():
        call()
        if name != "decode":
            check_close(f"{rows} rows {name}", outputs[name], out_decode)
        if DEVICE == "cuda":
            us = graph_replay_us(call)
        else:
            t0 = time.perf_counter()
            call()
            us = (time.perf_counter() - t0) * 1e6
        result[f"{name} us"] = us
        result[f"{name} GB/s"] = kv_bytes / us / 1e3
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64, 128, 192, 256])
    ap.add_argument("--lo", type=int, default=500)
    ap.add_argument("--hi", type=int, default=1100)
    ap.add_argument("--graph-tokens", type=int, default=8192, help="the mixed graph's size")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--smoke", action="store_true", help="a few short rows on the CPU")
    args = ap.parse_args()
    dtype = torch.bfloat16
    if args.smoke:
        if DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs on the CPU under TRITON_INTERPRET=1")
        args.rows, args.lo, args.hi, args.graph_tokens, args.max_num_seqs = [3], 20, 60, 256, 8
        dtype = torch.float16
    elif DEVICE != "cuda":
        raise SystemExit("bench_mixed_decode.py needs a CUDA GPU (or --smoke)")
    results = [bench_rows(rows, args, dtype) for rows in args.rows]
    columns = ["rows", "mean context"]
    for name in ("decode", "prefill/graph", "prefill/eager"):
        columns += [f"{name} us", f"{name} GB/s"]
    print_table(results, columns)


if __name__ == "__main__":
    main()
