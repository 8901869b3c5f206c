"""The decode step's non-attention chain over 28 layers with cold weights, as the engine runs it:
cuBLAS GEMMs against the Triton GEMM of kernels/linear.py, with programmatic dependent launch
(kernels/pdl.py) off and on, and gate/up's GEMM with SiLU-and-multiply in its epilogue at more or
fewer sizes than the engine's.

Per layer: RMSNorm -> qkv GEMM; o GEMM (on a fixed attention output) -> add + RMSNorm ->
gate/up GEMM -> SiLU-and-mul -> down GEMM, the next layer's norm adding the residual. Variants:
  cublas        torch.mm for the four GEMMs (o and down then hand the norm bf16 outputs)
  triton        kernels/linear.py where the engine takes it (o and down as split-K partial sums
                up to 256 tokens, qkv and gate/up up to 128, gate/up ending in SiLU-and-multiply
                up to layers.linear.GATED_MAX_TOKENS), cuBLAS elsewhere; PDL off
  triton+pdl    the same, every Triton kernel launched as a programmatic dependent: the engine
  triton+pdl+gated    gate/up's GEMM ends in SiLU-and-multiply wherever the Triton GEMM takes it
  triton+pdl+nogated  never (the SiLU kernel at every size)
  mix+pdl       cuBLAS for qkv and gate/up at every size, PDL on
  ...+stagesN   any Triton mode with its GEMMs' pipelines cut to at most N stages (less shared
                memory per program, so the next kernel's programs can become resident sooner)
All captured in one CUDA graph; us per layer. Each variant's final residual is checked against
the first one's.

    python benchmarks/bench_layer_chain.py --m 16 64 128 256
"""

from __future__ import annotations

import argparse

import torch
from bench_common import DEVICE, check_close, graph_calls_us
from minivllm.kernels import pdl
from minivllm.kernels.activation import silu_and_mul
from minivllm.kernels.fused_norm import fused_add_rmsnorm, rmsnorm
from minivllm.kernels.linear import gemm_config, linear, supports
from minivllm.layers.linear import GATED_MAX_TOKENS

HIDDEN, QKV, ATTN, INTER, LAYERS = 1024, 4096, 2048, 3072, 28


class Chain:
    def __init__(self, m: int, mode: str):
        self.m, self.mode = m, mode
        base, _, stages = mode.partition("+stages")
        self.max_stages = int(stages) if stages else None
        mode = base
        self.gated = mode.endswith("+gated") or (
            mode.startswith("triton") and not mode.endswith("+nogated") and m <= GATED_MAX_TOKENS
        )
        g = torch.Generator(device="cuda").manual_seed(0)

        def rnd(*shape, scale=0.02):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g) * scale

        self.w = [
            {
                "qkv": rnd(QKV, HIDDEN),
                "o": rnd(HIDDEN, ATTN),
                "gate_up": rnd(2 * INTER, HIDDEN),
                "down": rnd(HIDDEN, INTER),
            }
            for _ in range(LAYERS)
        ]
        self.norm_w = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
        self.attn = rnd(m, ATTN, scale=1.0)
        self.res0 = rnd(m, HIDDEN, scale=1.0)

    def gemm(self, x, layer, name, partials=False):
        w = self.w[layer][name]
        if (
            self.mode == "cublas"
            or (self.mode.startswith("mix") and not partials)
            or not supports(x, w, partials)
        ):  # where the engine keeps cuBLAS too
            return torch.mm(x, w.t())
        return linear(x, w, partials=partials, config=self.config(x, w, partials))

    def config(self, x, w, partials=False, gated=False):
        """The engine's GEMM configuration, its stages capped at max_stages; None: as is."""
        if self.max_stages is None:
            return None
        n = w.shape[0] // 2 if gated else w.shape[0]
        cfg = gemm_config(x.shape[0], n, x.shape[1], partials, gated=gated)
        return cfg._replace(num_stages=min(cfg.num_stages, self.max_stages))

    def run(self):
        res = self.res0
        h = rmsnorm(res, self.norm_w, 1e-6)
        for layer in range(LAYERS):
            self.gemm(h, layer, "qkv")
            o = self.gemm(self.attn, layer, "o", partials=True)
            h, res = fused_add_rmsnorm(o, res, self.norm_w, 1e-6)
            w = self.w[layer]["gate_up"]
            if self.gated and supports(h, w, gated=True):
                act = linear(h, w, gated=True, config=self.config(h, w, gated=True))
            else:
                act = silu_and_mul(self.gemm(h, layer, "gate_up"))
            down = self.gemm(act, layer, "down", partials=True)
            h, res = fused_add_rmsnorm(down, res, self.norm_w, 1e-6)  # the next input norm
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--m", type=int, nargs="+", default=[1, 2, 4, 8, *range(16, 257, 16)]
    )  # the decode graph buckets
    ap.add_argument(
        "--modes",
        nargs="+",
        default=[
            "cublas",
            "triton",
            "triton+pdl",
            "triton+pdl+nogated",
            "triton+pdl+gated",
            "mix+pdl",
        ],
    )
    args = ap.parse_args()
    if DEVICE != "cuda":
        print("bench_layer_chain.py needs a CUDA GPU; nothing to do here")
        return
    print(f"{'M':>5}" + "".join(f"{mode:>18}" for mode in args.modes) + "   (us per layer)")
    for m in args.m:
        row, ref = [], None
        for mode in args.modes:
            pdl._PDL = "+pdl" in mode
            chain = Chain(m, mode)
            out = chain.run().float()
            if ref is None:
                ref = out
            else:
                check_close(f"M={m} {mode}", out, ref)
            row.append(graph_calls_us([chain.run]) / LAYERS)
            del chain
            torch.cuda.empty_cache()
        print(f"{m:>5}" + "".join(f"{t:>18.2f}" for t in row), flush=True)
    pdl._PDL = True


if __name__ == "__main__":
    main()
