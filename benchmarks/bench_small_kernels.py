"""The small per-layer kernels of a decode step at decode batch sizes (Qwen3-0.6B shapes, bf16),
each timed as a CUDA-graph replay of 10 launches, so the time is the GPU's own including the
in-graph launch gap: RMSNorm, add + RMSNorm (plain and over split-K partials), q/k norm + rope +
KV store, SiLU-and-mul, and the down projection's split-K.

A variant that folded silu(gate) * up into the split-K's operand loads was tried and dropped: each
output-tile program recomputes the activation of its K slice, and it ran 1.6-3x slower than
SiLU-and-mul followed by the plain split-K (docs/benchmark_history.md, session 4).

    python benchmarks/bench_small_kernels.py --m 8 64 128 256
"""

from __future__ import annotations

import argparse

import torch
from bench_common import graph_replay_us
from minivllm.kernels.activation import silu_and_mul
from minivllm.kernels.fused_norm import fused_add_rmsnorm, rmsnorm
from minivllm.kernels.linear import linear
from minivllm.kernels.qk_norm_rope import qk_norm_rope_store_kv

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 1024, 16, 8, 128, 3072
BLOCK_SIZE, NUM_BLOCKS = 16, 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[8, 64, 128, 256])
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    w_norm = torch.rand(HIDDEN, device=dev, dtype=dt)
    w_head = torch.rand(HEAD_DIM, device=dev, dtype=dt)
    w_down = torch.randn(HIDDEN, INTER, device=dev, dtype=dt) * 0.02
    cos = torch.rand(4096, HEAD_DIM, device=dev, dtype=dt)
    sin = torch.rand(4096, HEAD_DIM, device=dev, dtype=dt)
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache = torch.zeros(cache_shape, device=dev, dtype=dt)
    v_cache = torch.zeros(cache_shape, device=dev, dtype=dt)
    print(
        f"{'M':>5}{'rmsnorm':>9}{'add+norm':>10}{'+8 parts':>10}{'qk+rope+kv':>12}{'silu':>7}"
        f"{'down':>7}   (us per launch)"
    )
    for m in args.m:
        x = torch.randn(m, HIDDEN, device=dev, dtype=dt)
        res = torch.randn(m, HIDDEN, device=dev, dtype=dt)
        parts = torch.randn(8, m, HIDDEN, device=dev)
        qkv = torch.randn(m, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=dev, dtype=dt)
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
        q = q.view(m, HEADS, HEAD_DIM)
        k, v = k.view(m, KV_HEADS, HEAD_DIM), v.view(m, KV_HEADS, HEAD_DIM)
        positions = torch.randint(0, 4096, (m,), device=dev, dtype=torch.int32)
        slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, device=dev)[:m].to(torch.int32)
        gate_up = torch.randn(m, 2 * INTER, device=dev, dtype=dt)
        act = silu_and_mul(gate_up)
        row = [
            graph_replay_us(lambda x=x: rmsnorm(x, w_norm, 1e-6)),
            graph_replay_us(lambda x=x, res=res: fused_add_rmsnorm(x, res, w_norm, 1e-6)),
            graph_replay_us(lambda p=parts, res=res: fused_add_rmsnorm(p, res, w_norm, 1e-6)),
            graph_replay_us(
                lambda q=q, k=k, v=v, pos=positions, s=slots: qk_norm_rope_store_kv(
                    q, k, v, pos, cos, sin, k_cache, v_cache, s, w_head, w_head
                )
            ),
            graph_replay_us(lambda g=gate_up: silu_and_mul(g)),
        ]
        row.append(graph_replay_us(lambda a=act: linear(a, w_down, partials=True)))
        print(f"{m:>5}" + "".join(f"{t:>{w}.2f}" for t, w in zip(row, (9, 10, 10, 12, 7, 7))))


if __name__ == "__main__":
    main()
