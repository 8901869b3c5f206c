"""The model's GEMMs at decode batch sizes: cuBLAS (torch.mm) against the engine's split-K partial
sums (kernels/linear.py) over a sweep of configurations, each timed inside a CUDA graph (10
launches per replay) so launch cost is the GPU's own. The partials' sum is the consumer's work
(the add + RMSNorm that follows o_proj / down_proj), not timed here.

A variant where the last program of each output tile added the partials itself (no consumer
needed) was tried and dropped: it was no faster than cuBLAS (RESULTS.md, third session).

    python benchmarks/bench_gemm.py --m 16 64 128 256
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import graph_replay_us  # noqa: E402

from minivllm.kernels.linear import splitk_config, splitk_partials  # noqa: E402

SHAPES = {  # Qwen3-0.6B: name -> (N, K) of y = x @ W^T
    "qkv": (4096, 1024),
    "o": (1024, 2048),
    "gate_up": (6144, 1024),
    "down": (1024, 3072),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[16, 64, 128, 256])
    ap.add_argument("--blas", choices=["cublas", "cublaslt"], default=None,
                    help="torch.backends.cuda.preferred_blas_library for the cuBLAS column")
    args = ap.parse_args()
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    torch.manual_seed(0)
    print(f"{'layer':<8}{'M':>5}{'cublas':>8}{'split-K':>9}  {'best config':<24}{'engine':>8}"
          f"{'cublas GB/s':>13}")
    totals: dict[int, list[float]] = {}
    for m in args.m:
        for name, (n, k) in SHAPES.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            ref = torch.mm(x, w.t()).float()
            t_cublas = graph_replay_us(lambda x=x, w=w, out=out: torch.mm(x, w.t(), out=out))
            best = (float("inf"), None)
            bms = sorted({max(16, min(64, triton.next_power_of_2(m))), max(16, min(128, m))})
            for bm, bn, bk, stages, splits in itertools.product(
                    bms, (32, 64, 128), (64, 128), (3, 4), (1, 2, 4, 8)):
                if k % (splits * bk) or n % bn:
                    continue
                warps = 8 if bm * bn >= 128 * 64 else 4
                cfg = (splits, bm, bn, bk, warps, stages)
                try:
                    parts = splitk_partials(x, w, cfg)
                    torch.cuda.synchronize()
                    if not torch.allclose(parts.sum(0), ref, atol=2e-2, rtol=2e-2):
                        print("mismatch", name, m, cfg)
                        continue
                    t = graph_replay_us(lambda x=x, w=w, cfg=cfg: splitk_partials(x, w, cfg))
                except Exception as e:  # noqa: BLE001 -- out of shared memory and the like
                    print("failed", name, m, cfg, type(e).__name__)
                    continue
                best = min(best, (t, cfg))
            engine_cfg = splitk_config(m, n, k)
            t_engine = (graph_replay_us(lambda x=x, w=w: splitk_partials(x, w))
                        if engine_cfg is not None else float("nan"))
            tot = totals.setdefault(m, [0.0, 0.0])
            tot[0] += t_cublas
            tot[1] += best[0]
            print(f"{name:<8}{m:>5}{t_cublas:>8.2f}{best[0]:>9.2f}  {best[1]!s:<24}"
                  f"{t_engine:>8.2f}{n * k * 2 / t_cublas / 1e3:>13,.0f}")
    print("config = (splits, BM, BN, BK, warps, stages); engine = splitk_config's choice "
          "(nan: the engine keeps cuBLAS for this shape)")
    for m, (c, p) in totals.items():
        print(f"per layer at M={m}: cuBLAS {c:.1f} us, best split-K partials {p:.1f} us")


if __name__ == "__main__":
    main()
