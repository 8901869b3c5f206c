"""The decode step's non-attention chain over 28 layers with cold weights, as the engine runs it:
cuBLAS GEMMs against the Triton GEMM of kernels/linear.py, with programmatic dependent launch
(kernels/pdl.py) off and on, gate/up's GEMM with SiLU-and-multiply in its epilogue, and the o /
down GEMMs with the add + RMSNorm after them folded in (kernels/linear_norm.py).

Per layer: RMSNorm -> qkv GEMM; o GEMM (on a fixed attention output) -> add + RMSNorm ->
gate/up GEMM -> SiLU-and-mul -> down GEMM, the next layer's norm adding the residual. Variants:
  cublas        torch.mm for the four GEMMs (o and down then hand the norm bf16 outputs)
  triton        kernels/linear.py where the engine takes it (o and down as split-K partial sums
                up to 256 tokens, qkv and gate/up up to 128), cuBLAS elsewhere; PDL off
  triton+pdl    the same, every Triton kernel launched as a programmatic dependent
  triton+pdl+gated  and gate/up's GEMM ends in SiLU-and-multiply where the Triton GEMM takes it
                (no activation kernel): the "gated_mlp" experiment
  triton+pdl+splitk_norm  triton+pdl with o / down and the add + RMSNorm after each as one kernel
                wherever the split-K GEMM runs (every M up to 256, past the layers' bound
                linear_norm.MAX_TOKENS, so the table shows where it pays): the "splitk_norm"
                experiment; "+gated+splitk_norm" has both
  mix+pdl       cuBLAS for qkv and gate/up at every size, PDL on
  persistent    kernels/decode_chain.py: the whole chain, every layer, in one launch of one
                program per SM, phases split by grid barriers, each program prefetching its next
                phase's weights into L2 (bulk, TMA) before it arrives (up to 16 tokens; "-" past)
  persistent-nopf   the same without the L2 prefetch
  persistent+early  the prefetch issued at the start of the phase before instead
  persistent+lines  one prefetch.global.L2 per 128-byte line instead of the bulk prefetches
  persistent/launch the same kernel launched once per phase (kernel boundaries, no PDL, instead
                of grid barriers): the phases' own cost, and what a barrier saves over a boundary
All captured in one CUDA graph; us per layer. Each variant's final residual is checked against
the first one's.

    python benchmarks/bench_layer_chain.py --m 16 64 128 256
    python benchmarks/bench_layer_chain.py --m 1 8 16 32 64 128 --modes triton+pdl \
        triton+pdl+splitk_norm
    python benchmarks/bench_layer_chain.py --m 1 2 4 8 16 --modes triton+pdl persistent
    python benchmarks/bench_layer_chain.py --m 1 16 --modes triton+pdl persistent \
        --chain-config splits=1 block_k=128 num_stages=8
"""

from __future__ import annotations

import argparse

import torch
from bench_common import DEVICE, check_close, graph_calls_us
from minivllm.kernels import decode_chain, pdl
from minivllm.kernels.activation import silu_and_mul
from minivllm.kernels.fused_norm import fused_add_rmsnorm, rmsnorm
from minivllm.kernels.linear import linear, supports
from minivllm.kernels.linear_norm import linear_add_rmsnorm

HIDDEN, QKV, ATTN, INTER, LAYERS = 1024, 4096, 2048, 3072, 28
# The persistent modes' L2 prefetch (ChainConfig.prefetch).
PERSISTENT_PREFETCH = {
    "persistent": 1,
    "persistent-nopf": 0,
    "persistent+early": 2,
    "persistent+lines": 3,
    "persistent/launch": 0,  # no barrier to prefetch across
}


class Chain:
    def __init__(self, m: int, mode: str, chain_config: dict[str, int] | None = None):
        self.m, self.mode = m, mode
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
        if mode in PERSISTENT_PREFETCH:  # the same weights, stacked per kind
            kinds = ("qkv", "o", "gate_up", "down")
            self.stacked = decode_chain.ChainWeights(
                **{kind: torch.stack([w[kind] for w in self.w]) for kind in kinds},
                norm=self.norm_w.expand(LAYERS, 2, HIDDEN).contiguous(),
            )
            self.w = []  # the per-layer copies
            self.config = decode_chain.ChainConfig(
                **{**(chain_config or {}), "prefetch": PERSISTENT_PREFETCH[mode]}
            )
            self.workspace = decode_chain.make_workspace(m, self.stacked, config=self.config)
            self.out = torch.empty_like(self.res0)

    def gemm(self, x, layer, name, partials=False):
        w = self.w[layer][name]
        if (
            self.mode == "cublas"
            or (self.mode.startswith("mix") and not partials)
            or not supports(x, w, partials)
        ):  # where the engine keeps cuBLAS too
            return torch.mm(x, w.t())
        return linear(x, w, partials=partials)

    def add_rmsnorm(self, x, layer, name, res):
        """The row-parallel GEMM `name` of x, then the add + RMSNorm after it: one kernel with
        +splitk_norm where the split-K GEMM takes x, else two."""
        w = self.w[layer][name]
        if "+splitk_norm" in self.mode and supports(x, w, partials=True):
            return linear_add_rmsnorm(x, w, res, self.norm_w, 1e-6)
        return fused_add_rmsnorm(self.gemm(x, layer, name, partials=True), res, self.norm_w, 1e-6)

    def run(self):
        if self.mode in PERSISTENT_PREFETCH:
            return decode_chain.decode_chain(
                self.res0,
                self.attn,
                self.stacked,
                1e-6,
                self.workspace,
                out=self.out,
                config=self.config,
                phases_per_launch=1 if self.mode.endswith("/launch") else None,
            )
        res = self.res0
        h = rmsnorm(res, self.norm_w, 1e-6)
        for layer in range(LAYERS):
            self.gemm(h, layer, "qkv")
            h, res = self.add_rmsnorm(self.attn, layer, "o", res)
            w = self.w[layer]["gate_up"]
            if "+gated" in self.mode and supports(h, w, gated=True):
                act = linear(h, w, gated=True)
            else:
                act = silu_and_mul(self.gemm(h, layer, "gate_up"))
            h, res = self.add_rmsnorm(act, layer, "down", res)  # the next input norm
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
            "triton+pdl+gated",
            "triton+pdl+splitk_norm",
            "mix+pdl",
        ],
    )
    ap.add_argument(
        "--chain-config",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="the persistent modes' ChainConfig fields, e.g. block_k=128 num_stages=8 splits=1",
    )
    args = ap.parse_args()
    chain_config = {k: int(v) for k, v in (kv.split("=") for kv in args.chain_config)}
    if DEVICE != "cuda":
        print("bench_layer_chain.py needs a CUDA GPU; nothing to do here")
        return
    widths = [max(18, len(mode) + 2) for mode in args.modes]
    print(
        f"{'M':>5}"
        + "".join(f"{mode:>{w}}" for mode, w in zip(args.modes, widths))
        + "   (us per layer)"
    )
    for m in args.m:
        row: list[float | None] = []
        ref = None
        for mode in args.modes:
            if mode in PERSISTENT_PREFETCH and m > decode_chain.MAX_TOKENS:
                row.append(None)
                continue
            pdl._PDL = "+pdl" in mode
            chain = Chain(m, mode, chain_config)
            out = chain.run().float()
            if ref is None:
                ref = out
            else:
                check_close(f"M={m} {mode}", out, ref)
            row.append(graph_calls_us([chain.run]) / LAYERS)
            if mode in PERSISTENT_PREFETCH and chain.workspace.timeouts.item():
                print(f"BARRIER TIMEOUTS M={m} {mode}: {chain.workspace.timeouts.item()}")
            del chain
            torch.cuda.empty_cache()
        cells = (
            f"{t:>{w}.2f}" if t is not None else f"{'-':>{w}}"
            for t, w in zip(row, widths, strict=True)
        )
        print(f"{m:>5}" + "".join(cells), flush=True)
    pdl._PDL = True


if __name__ == "__main__":
    main()
