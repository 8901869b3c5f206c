"""The model's GEMMs at decode batch sizes with cold weights: cuBLAS (torch.mm) against the
engine's Triton GEMM (kernels/linear.py) with its own configuration and over a sweep of tile
shapes, K splits and pipeline depths.

Each timed call reads a different copy of the weight (8 copies, more than the L2 holds), as the
model's 28 layers do, so a GEMM pays its weight reads from HBM. All calls of a case are captured
in one CUDA graph; us per call. Split-K rows (o, down) leave float32 partial sums, which the
add + RMSNorm that follows adds up (not timed here). PDL is off here: a chain of kernels is what
`bench_layer_chain.py` times. `gate_up+silu` is gate/up with SiLU-and-multiply in the GEMM's
epilogue (`gated`), against cuBLAS and the plain Triton GEMM each followed by the activation
kernel.

    python benchmarks/bench_gemm.py --m 16 64 128 256 [--model-shape 8b]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import triton
from bench_common import DEVICE, graph_calls_us
from minivllm.kernels import pdl
from minivllm.kernels.activation import silu_and_mul
from minivllm.kernels.linear import GemmConfig, gemm_config, linear, supports
from workload import MODEL_SHAPES


def model_shapes(model_shape: str = "0.6b") -> dict[str, tuple[int, int, bool]]:
    """name -> (N, K, partials) of y = x @ W^T for a Qwen3 shape of workload.MODEL_SHAPES."""
    cfg = {**QWEN3_06B, **MODEL_SHAPES[model_shape]}
    hidden, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {
        "qkv": (q + 2 * kv, hidden, False),
        "o": (hidden, q, True),
        "gate_up": (2 * inter, hidden, False),
        "down": (hidden, inter, True),
        "gate_up+silu": (2 * inter, hidden, False),
        # the column-parallel ones as split-K partial sums (a consumer would have to add them up)
        "qkv/p": (q + 2 * kv, hidden, True),
        "gate_up/p": (2 * inter, hidden, True),
        "lm_head": (cfg["vocab_size"], hidden, False),  # once per step, not per layer
    }


# Qwen3-0.6B's config (what workload.MODEL_SHAPES changes for the larger shapes).
QWEN3_06B = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
}
SHAPES = model_shapes()
COPIES = 8  # weight copies cycled through, so every call reads its weight from HBM


def cold_replay_us(fns) -> float:
    """Median microseconds per call of the fns (one per weight copy), all captured in one graph."""
    return graph_calls_us(fns, samples=15) / len(fns)


def configs(m: int, k: int, partials: bool, gated: bool = False, depths=(2, 3, 4, 5)):
    """GemmConfig candidates; splits > 1 only for partial sums. Shared memory per program is
    kept to what fits (stages x (BM + BN) x BK x 2 bytes <= 200 KB, two BN tiles when gated)."""
    xm = max(16, triton.next_power_of_2(m))
    tiles = 2 if gated else 1
    for bm, bn, bk, stages, splits in itertools.product(
        sorted({min(xm, 128), min(xm, 64), 16 if xm <= 32 else 32}),
        (32, 64, 128) if gated or (m <= 32 and not partials) else (64, 128),
        (64, 128),
        depths,
        (1, 2, 4, 8) if partials else (1,),
    ):
        if k % (splits * bk) or (bm + tiles * bn) * bk * 2 * stages > 200_000:
            continue
        yield GemmConfig(splits, bm, bn, bk, 4, stages, True)
    if m >= 64 and not partials and not gated:  # token rows on the MMA's M side
        for bm, bn, bk, stages, warps in itertools.product(
            (64, 128), (64, 128, 256), (64, 128), (2, 3, 4), (4, 8)
        ):
            if bm > xm or (bm == 128 and warps == 4) or (bm + bn) * bk * 2 * stages > 200_000:
                continue
            yield GemmConfig(1, bm, bn, bk, warps, stages, False)


def time_config(x, ws, ref, partials: bool, cfg, name: str, gated: bool = False) -> float:
    """us per call of the Triton GEMM with `cfg` over the weight copies `ws`, after checking one
    call against `ref` (x @ ws[0]^T in float32; its SiLU-and-multiply when gated)."""
    y = linear(x, ws[0], partials=partials, gated=gated, config=cfg)
    torch.cuda.synchronize()
    got = y.sum(0) if partials else y.float()
    if not torch.allclose(got, ref, atol=3e-2, rtol=3e-2):
        print("MISMATCH", name, x.shape[0], cfg)
    return cold_replay_us(
        [lambda w=w: linear(x, w, partials=partials, gated=gated, config=cfg) for w in ws]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[16, 64, 128, 192, 256])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--model-shape", default="0.6b", choices=list(MODEL_SHAPES), help="whose GEMMs")
    ap.add_argument("--no-sweep", action="store_true", help="cuBLAS and the engine's config only")
    ap.add_argument("--top", type=int, default=3, help="best sweep configs printed per case")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4, 5], help="swept depths")
    args = ap.parse_args()
    if DEVICE != "cuda":
        print("bench_gemm.py needs a CUDA GPU (tensor descriptors); nothing to do here")
        return
    pdl._PDL = False  # one kernel at a time here
    torch.manual_seed(0)
    t0 = time.time()
    per_layer: dict[int, list[float]] = {}
    print(
        f"{'layer':<8}{'M':>5}{'cublas':>8}{'engine':>8}{'best':>8}  best sweep configs "
        "(splits, BM, BN, BK, warps, stages, swap): us"
    )
    shapes = model_shapes(args.model_shape)
    print(
        f"Qwen3-{args.model_shape} shapes: "
        + ", ".join(f"{s} {v[0]}x{v[1]}" for s, v in shapes.items())
    )
    for m in args.m:
        for name in args.shapes:
            n, k, partials = shapes[name]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ws = [
                torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)
            ]
            ref = torch.mm(x, ws[0].t()).float()
            outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in ws]
            gated = name.endswith("+silu")
            if gated:  # cuBLAS, then the activation kernel; the engine's config: gated
                ref = silu_and_mul(ref.to(torch.bfloat16)).float()
                t_cublas = cold_replay_us(
                    [
                        lambda x=x, w=w, o=o: silu_and_mul(torch.mm(x, w.t(), out=o))
                        for w, o in zip(ws, outs)
                    ]
                )
                if supports(x, ws[0], gated=True):
                    t_plain = cold_replay_us(
                        [lambda x=x, w=w: silu_and_mul(linear(x, w)) for w in ws]
                    )
                    print(f"{'':<8}{m:>5}  plain Triton GEMM + activation kernel: {t_plain:.2f}")
            else:
                t_cublas = cold_replay_us(
                    [lambda x=x, w=w, o=o: torch.mm(x, w.t(), out=o) for w, o in zip(ws, outs)]
                )
            if not supports(x, ws[0], partials, gated):
                print(f"{name:<8}{m:>5}{t_cublas:>8.2f}  (cuBLAS only at this size)", flush=True)
                continue
            cfg = gemm_config(m, n // 2 if gated else n, k, partials, gated=gated)
            t_engine = time_config(x, ws, ref, partials, cfg, name, gated)
            results = []
            for cfg in [] if args.no_sweep else configs(m, k, partials, gated, args.stages):
                try:
                    results.append((time_config(x, ws, ref, partials, cfg, name, gated), cfg))
                except Exception as e:  # noqa: BLE001 -- out of resources and the like
                    print("failed", name, m, cfg, type(e).__name__, str(e)[:80])
            results.sort()
            best = results[0][0] if results else float("nan")
            tops = "; ".join(f"{tuple(c)}: {t:.2f}" for t, c in results[: args.top])
            print(
                f"{name:<8}{m:>5}{t_cublas:>8.2f}{t_engine:>8.2f}{best:>8.2f}  {tops}", flush=True
            )
            if name in ("qkv", "o", "gate_up", "down"):  # the four projections of a layer
                s = per_layer.setdefault(m, [0.0, 0.0])
                s[0] += t_cublas
                s[1] += t_engine
            del ws, outs
            torch.cuda.empty_cache()
    for m, (c, e) in per_layer.items():
        print(
            f"per layer at M={m}: cuBLAS {c:.1f} us, engine {e:.1f} us (partials' sum not included)"
        )
    print(f"took {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
