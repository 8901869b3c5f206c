"""The model's GEMMs at decode batch sizes: cuBLAS (torch.mm) against Triton split-K, each timed
inside a CUDA graph (10 launches per replay) so launch cost is the GPU's own.

Triton variants (best configuration per shape reported):
  * "partials": split-K writing float32 partial sums [S, M, N] (a consumer such as the next
    RMSNorm would add them up; the extra bytes are reported);
  * "self": split-K where the last program of each output tile to finish adds the partials up in
    split order (deterministic) and writes the bf16 output: a drop-in replacement for torch.mm.

    python benchmarks/bench_gemm.py --m 16 64 128 256
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

SHAPES = {  # Qwen3-0.6B: name -> (N, K) of y = x @ W^T
    "qkv": (4096, 1024),
    "o": (1024, 2048),
    "gate_up": (6144, 1024),
    "down": (1024, 3072),
}


@triton.jit
def _splitk_kernel(x_ptr, w_ptr, part_ptr, out_ptr, counter_ptr, M, N, K, k_per_split,
                   num_splits, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   SELF_REDUCE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_s * k_per_split + tl.arange(0, BK)
    m_mask = offs_m[:, None] < M
    x_ptrs = x_ptr + offs_m[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, k_per_split, BK):
        a = tl.load(x_ptrs, mask=m_mask, other=0.0)
        b = tl.load(w_ptrs)
        acc = tl.dot(a, tl.trans(b), acc)
        x_ptrs += BK
        w_ptrs += BK
    tile = offs_m[:, None] * N + offs_n[None, :]
    if num_splits == 1 and SELF_REDUCE:
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=m_mask)
        return
    tl.store(part_ptr + pid_s * M * N + tile, acc, mask=m_mask)
    if SELF_REDUCE:
        tile_id = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter_ptr + tile_id, 1)  # acq_rel: orders the store above
        if arrived == num_splits - 1:
            total = tl.zeros((BM, BN), dtype=tl.float32)
            for s in range(num_splits):
                total += tl.load(part_ptr + s * M * N + tile, mask=m_mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=m_mask)
            tl.atomic_xchg(counter_ptr + tile_id, 0)


def splitk(x, w, part, out, counters, splits, bm, bn, bk, warps, stages, self_reduce):
    m, k = x.shape
    n = w.shape[0]
    _splitk_kernel[(n // bn, triton.cdiv(m, bm), splits)](
        x, w, part, out, counters, m, n, k, k // splits, splits, BM=bm, BN=bn, BK=bk,
        SELF_REDUCE=self_reduce, num_warps=warps, num_stages=stages)


def graph_time_us(fn, reps: int = 10) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[16, 64, 128, 256])
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{'layer':<8}{'M':>5}{'cublas':>8}{'partials':>10}  {'config':<24}{'self':>7}  "
          f"{'config':<24}{'cublas GB/s':>12}")
    totals: dict[int, list[float]] = {}
    counters = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    for m in args.m:
        for name, (n, k) in SHAPES.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            part = torch.empty(8 * m * n, device="cuda", dtype=torch.float32)
            ref = torch.mm(x, w.t())
            t_cublas = graph_time_us(lambda x=x, w=w, out=out: torch.mm(x, w.t(), out=out))
            best = {False: (float("inf"), None), True: (float("inf"), None)}
            bms = sorted({max(16, min(64, triton.next_power_of_2(m))), max(16, min(128, m))})
            for bm, bn, bk, stages, splits, self_reduce in itertools.product(
                    bms, (32, 64, 128), (64, 128), (3, 4), (1, 2, 4, 8), (False, True)):
                if k % (splits * bk) or n % bn:
                    continue
                warps = 8 if bm * bn >= 128 * 64 else 4
                cfg = (splits, bm, bn, bk, warps, stages)

                def call(cfg=cfg, x=x, w=w, out=out, part=part, sr=self_reduce):
                    splitk(x, w, part, out, counters, *cfg, sr)

                try:
                    out.zero_()
                    call()
                    torch.cuda.synchronize()
                    if self_reduce or splits == 1:
                        got = out.float() if self_reduce else None
                    else:
                        got = None
                    if got is None:
                        got = part[: splits * m * n].view(splits, m, n).sum(0)
                    if not torch.allclose(got, ref.float(), atol=2e-2, rtol=2e-2):
                        print("mismatch", name, m, cfg, self_reduce)
                        continue
                    t = graph_time_us(call)
                except Exception as e:  # noqa: BLE001 -- out of shared memory and the like
                    print("failed", name, m, cfg, type(e).__name__)
                    continue
                best[self_reduce] = min(best[self_reduce], (t, cfg))
            tot = totals.setdefault(m, [0.0, 0.0, 0.0])
            tot[0] += t_cublas
            tot[1] += best[False][0]
            tot[2] += best[True][0]
            print(f"{name:<8}{m:>5}{t_cublas:>8.2f}{best[False][0]:>10.2f}  "
                  f"{best[False][1]!s:<24}{best[True][0]:>7.2f}  {best[True][1]!s:<24}"
                  f"{n * k * 2 / t_cublas / 1e3:>12,.0f}")
    print("config = (splits, BM, BN, BK, warps, stages)")
    for m, (c, p, s) in totals.items():
        print(f"per layer at M={m}: cuBLAS {c:.1f} us, split-K partials {p:.1f} us, "
              f"split-K self-reduced {s:.1f} us")


if __name__ == "__main__":
    main()
