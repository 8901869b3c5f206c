"""The qkv and gate/up projections of a decode step with their elementwise consumers in the GEMM's
epilogue (kernels/fused_gemm.py), against cuBLAS followed by the separate Triton kernel (the
engine's path without the fusion), at decode batch sizes, Qwen3-0.6B shapes, bf16. Each time is
a CUDA-graph replay of 10 launches (bench_common.graph_replay_us), so it is the GPU's own time
including the in-graph launch gap. Columns: cuBLAS alone, cuBLAS + kernel, the fused kernel at
its default configuration, and the best configuration of a sweep.

    python benchmarks/bench_fused_gemm.py --m 8 64 128 256 [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import graph_replay_us  # noqa: E402

from minivllm.kernels.activation import silu_and_mul  # noqa: E402
from minivllm.kernels.fused_gemm import gate_up_silu, qkv_norm_rope  # noqa: E402
from minivllm.kernels.qk_norm_rope import qk_norm_rope_store_kv  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 1024, 16, 8, 128, 3072
BLOCK_SIZE, NUM_BLOCKS = 16, 4096


def _best(fn, configs) -> tuple[float, object]:
    best = (float("inf"), None)
    for config in configs:
        try:
            t = graph_replay_us(lambda c=config: fn(c))
        except Exception as exc:  # noqa: BLE001 - a config the compiler rejects (shared memory)
            print(f"    skip {config}: {type(exc).__name__}")
            continue
        best = min(best, (t, config), key=lambda b: b[0])
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8, 32, 64, 128, 192, 256])
    ap.add_argument("--sweep", action="store_true", help="also time a sweep of configurations")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    w_qkv = torch.randn((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, device=dev, dtype=dt) * 0.03
    w_gu = torch.randn(2 * INTER, HIDDEN, device=dev, dtype=dt) * 0.03
    w_head = torch.rand(HEAD_DIM, device=dev, dtype=dt) + 0.5
    cos = torch.rand(4096, HEAD_DIM, device=dev, dtype=dt)
    sin = torch.rand(4096, HEAD_DIM, device=dev, dtype=dt)
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache = torch.zeros(cache_shape, device=dev, dtype=dt)
    v_cache = torch.zeros(cache_shape, device=dev, dtype=dt)
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    print(f"{'layer':<9}{'M':>5}{'cublas':>8}{'+kernel':>9}{'fused':>8}{'best':>8}  best config"
          f"   max|fused-unfused|   (us per launch)")
    totals: dict[int, list[float]] = {}
    for m in args.m:
        x = torch.randn(m, HIDDEN, device=dev, dtype=dt)
        positions = torch.randint(0, 4096, (m,), device=dev, dtype=torch.int32)
        slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, device=dev)[:m].to(torch.int32)
        qkv = torch.empty(m, q_size + 2 * kv_size, device=dev, dtype=dt)
        gu = torch.empty(m, 2 * INTER, device=dev, dtype=dt)

        def unfused_qkv(x=x, qkv=qkv, pos=positions, s=slots):
            torch.mm(x, w_qkv.t(), out=qkv)
            q, k, v = qkv.split([q_size, kv_size, kv_size], -1)
            return qk_norm_rope_store_kv(
                q.view(-1, HEADS, HEAD_DIM), k.view(-1, KV_HEADS, HEAD_DIM),
                v.view(-1, KV_HEADS, HEAD_DIM), pos, cos, sin, k_cache, v_cache, s,
                w_head, w_head)

        def fused_qkv(config=None, x=x, pos=positions, s=slots):
            return qkv_norm_rope(x, w_qkv, pos, cos, sin, k_cache, v_cache, s, HEADS,
                                 w_head, w_head, config=config)

        def unfused_gu(x=x, gu=gu):
            torch.mm(x, w_gu.t(), out=gu)
            return silu_and_mul(gu)

        def fused_gu(config=None, x=x):
            return gate_up_silu(x, w_gu, config=config)

        err_qkv = (fused_qkv().float() - unfused_qkv().float()).abs().max().item()
        err_gu = (fused_gu().float() - unfused_gu().float()).abs().max().item()
        bms = sorted({max(16, min(m_, 128)) for m_ in (16, 32, 64, 128) if m_ <= max(16, 2 * m)})
        rows = []
        qkv_configs = list(itertools.product(bms, (64, 128), (4, 8), (3, 4, 5)))
        gu_configs = list(itertools.product(bms, (32, 64), (64, 128), (4, 8), (3, 4)))
        for name, cublas, unfused, fused, configs, err in (
            ("qkv", lambda x=x, o=qkv: torch.mm(x, w_qkv.t(), out=o), unfused_qkv, fused_qkv,
             qkv_configs, err_qkv),
            ("gate_up", lambda x=x, o=gu: torch.mm(x, w_gu.t(), out=o), unfused_gu, fused_gu,
             gu_configs, err_gu),
        ):
            t_cublas = graph_replay_us(cublas)
            t_unfused = graph_replay_us(unfused)
            t_fused = graph_replay_us(fused)
            t_best, best = _best(fused, configs) if args.sweep else (float("nan"), None)
            rows.append((t_unfused, min(t_fused, t_best)))
            print(f"{name:<9}{m:>5}{t_cublas:>8.2f}{t_unfused:>9.2f}{t_fused:>8.2f}"
                  f"{t_best:>8.2f}  {best!s:<22}{err:>10.4f}", flush=True)
        totals[m] = [sum(r[0] for r in rows), sum(r[1] for r in rows)]
    print("\nper layer, qkv + gate_up: unfused -> fused (best config) us")
    for m, (unfused, fused) in totals.items():
        print(f"  M={m:<4} {unfused:7.2f} -> {fused:7.2f}")


if __name__ == "__main__":
    main()
