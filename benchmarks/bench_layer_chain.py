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
  ...+early     with --context: the decode kernel reads its first key tile before its PDL wait
                (`_decode_attention(early_loads=True)`)
  ...+gridN     with --context: the decode grid capped at N split programs per SM, each looping
                over every n-th split (the default caps it at 4 only up to 8 rows)
  ...+rearly    with --context: the rotary kernel reads each token's position, slot and cos /
                sin rows before its PDL wait (`early_loads`; the engine's MINIVLLM_ROPE_EARLY_LOADS)
  ...+wearlyN   each Triton GEMM program reads up to N of its first weight columns before its
                PDL wait (kernels/linear.py `early`; the engine's MINIVLLM_GEMM_EARLY_COLUMNS)
  ...+qkvsplitN the qkv GEMM as N split-K partial sums, which the rotary kernel adds up (with
                --context; the engine's MINIVLLM_QKV_SPLITS, up to 64 tokens)
All captured in one CUDA graph; us per layer. Each variant's final residual is checked against
the first one's.

With --context N the chain is the whole decoder layer as a decode step runs it: the qkv output
goes through q/k norm + rotary with the KV store (kernels/qk_norm_rope.py) and the paged decode
attention (kernels/paged_decode.py, with its reduce) over N tokens per row, in a per-layer cache
of shuffled 16-token blocks with block tables --table-width tokens wide (a server's
max_model_len; default N), and the attention output feeds the o GEMM: what an attention-side
change costs or saves between its PDL neighbours. --smoke runs two layers on the CPU (Triton's
interpreter, float16): a check of the script, not a measurement.

    python benchmarks/bench_layer_chain.py --m 16 64 128 256
    python benchmarks/bench_layer_chain.py --m 1 8 32 --modes triton+pdl --context 576
"""

from __future__ import annotations

import argparse
import os
import re
import time

import torch
import triton
from bench_common import DEVICE, check_close, graph_calls_us
from minivllm.kernels import pdl
from minivllm.kernels.activation import silu_and_mul
from minivllm.kernels.fused_norm import fused_add_rmsnorm, rmsnorm
from minivllm.kernels.linear import gemm_config, linear, supports
from minivllm.kernels.paged_decode import _decode_attention as decode_attention
from minivllm.kernels.qk_norm_rope import qk_norm_rope_store_kv
from minivllm.layers.linear import GATED_MAX_TOKENS, QKV_PARTIALS_MAX_TOKENS

# Qwen3-0.6B: hidden size, q + k + v, attention output, intermediate size, heads, layers
HIDDEN, QKV, ATTN, INTER, LAYERS = 1024, 4096, 2048, 3072, 28
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, ROPE_THETA = 16, 8, 128, 16, 1e6


class Chain:
    def __init__(
        self,
        m: int,
        mode: str,
        context: int = 0,
        table_width: int = 0,
        layers: int = LAYERS,
        dtype: torch.dtype = torch.bfloat16,
    ):
        self.m, self.mode, self.layers = m, mode, layers
        base, _, stages = mode.partition("+stages")
        self.max_stages = int(stages) if stages else None
        mode = base
        wearly = re.search(r"\+wearly(\d+)", mode)  # +wearlyN: early weight columns
        self.w_early = int(wearly.group(1)) if wearly else 0
        qkv_splits = re.search(r"\+qkvsplit(\d+)", mode)  # +qkvsplitN: qkv as partial sums
        self.qkv_splits = int(qkv_splits.group(1)) if qkv_splits else 0
        # +gridN: the decode grid capped at N split programs per SM (None: the default split's)
        grid = re.search(r"\+grid(\d+)", mode)
        sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 4
        self.grid_splits = (
            triton.cdiv(int(grid.group(1)) * sms, m * NUM_KV_HEADS) if grid is not None else None
        )
        self.gated = mode.endswith("+gated") or (
            mode.startswith("triton") and not mode.endswith("+nogated") and m <= GATED_MAX_TOKENS
        )
        g = torch.Generator(device=DEVICE).manual_seed(0)

        def rnd(*shape, scale=0.02):
            return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=g) * scale

        self.w = [
            {
                "qkv": rnd(QKV, HIDDEN),
                "o": rnd(HIDDEN, ATTN),
                "gate_up": rnd(2 * INTER, HIDDEN),
                "down": rnd(HIDDEN, INTER),
            }
            for _ in range(layers)
        ]
        self.norm_w = torch.ones(HIDDEN, device=DEVICE, dtype=dtype)
        self.attn = rnd(m, ATTN, scale=1.0)
        self.res0 = rnd(m, HIDDEN, scale=1.0)
        self.context = context
        if context:
            self._attention_inputs(context, max(table_width, context), rnd, g, dtype)

    def _attention_inputs(self, context, table_width, rnd, g, dtype):
        """Per layer a KV cache holding `context` tokens of each row in shuffled blocks; the
        decode step's own arrays: each row's new token at position context - 1."""
        m, per_row = self.m, triton.cdiv(context, BLOCK_SIZE)
        num_blocks = m * per_row
        shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        self.caches = [(rnd(*shape, scale=1.0), rnd(*shape, scale=1.0)) for _ in range(self.layers)]
        width = triton.cdiv(table_width, BLOCK_SIZE)
        self.block_tables = torch.full((m, width), -1, dtype=torch.int32, device=DEVICE)
        perm = torch.randperm(num_blocks, generator=g, device=DEVICE).to(torch.int32)
        self.block_tables[:, :per_row] = perm.view(m, per_row)
        self.seq_lens = torch.full((m,), context, dtype=torch.int32, device=DEVICE)
        self.positions = torch.full((m,), context - 1, dtype=torch.int32, device=DEVICE)
        last = self.block_tables[:, (context - 1) // BLOCK_SIZE]
        self.slot_mapping = last * BLOCK_SIZE + (context - 1) % BLOCK_SIZE
        self.row_order = torch.arange(m, dtype=torch.int32, device=DEVICE)
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
        freqs = torch.outer(torch.arange(context).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1).to(DEVICE)
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        self.qk_norm_w = torch.ones(HEAD_DIM, device=DEVICE, dtype=dtype)
        self.attn_out = torch.empty(m, NUM_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)

    def attention(self, h, layer):
        """qkv GEMM, q/k norm + rotary + KV store, then paged decode attention: [m, ATTN]."""
        w, parts = self.w[layer]["qkv"], {}
        if self.qkv_splits and self.m <= QKV_PARTIALS_MAX_TOKENS and supports(h, w, True):
            config = self.config(h, w, partials=True, splits=self.qkv_splits)
            qkv = linear(h, w, partials=True, config=config, early=self.w_early,
                         splits=self.qkv_splits)  # fmt: skip
            parts = {"num_parts": qkv.shape[0], "split_stride": qkv.stride(0)}
            qkv = qkv[0]  # q, k, v: views into the first partial sum
        else:
            qkv = self.gemm(h, layer, "qkv")
        kv_size = NUM_KV_HEADS * HEAD_DIM
        q, k, v = qkv.split([NUM_HEADS * HEAD_DIM, kv_size, kv_size], -1)
        k_cache, v_cache = self.caches[layer]
        q = qk_norm_rope_store_kv(
            q.view(self.m, NUM_HEADS, HEAD_DIM),
            k.view(self.m, NUM_KV_HEADS, HEAD_DIM),
            v.view(self.m, NUM_KV_HEADS, HEAD_DIM),
            self.positions,
            self.cos,
            self.sin,
            k_cache,
            v_cache,
            self.slot_mapping,
            self.qk_norm_w,
            self.qk_norm_w,
            early_loads="+rearly" in self.mode,
            **parts,
        )
        out = decode_attention(
            q,
            k_cache,
            v_cache,
            self.seq_lens,
            self.block_tables,
            HEAD_DIM**-0.5,
            out=self.attn_out,
            row_order=self.row_order,
            early_loads="+early" in self.mode,
            grid_splits=self.grid_splits,
        )
        return out.view(self.m, ATTN)

    def gemm(self, x, layer, name, partials=False):
        w = self.w[layer][name]
        if (
            self.mode == "cublas"
            or (self.mode.startswith("mix") and not partials)
            or not supports(x, w, partials)
        ):  # where the engine keeps cuBLAS too
            return torch.mm(x, w.t())
        config = self.config(x, w, partials)
        return linear(x, w, partials=partials, config=config, early=self.w_early)

    def config(self, x, w, partials=False, gated=False, splits=0):
        """The engine's GEMM configuration, its stages capped at max_stages; None: as is."""
        if self.max_stages is None:
            return None
        n = w.shape[0] // 2 if gated else w.shape[0]
        cfg = gemm_config(x.shape[0], n, x.shape[1], partials, gated=gated, splits=splits)
        return cfg._replace(num_stages=min(cfg.num_stages, self.max_stages))

    def add_norm(self, x, res, layer, name):
        """The row-parallel GEMM `name` of x, added to the residual, and the RMSNorm after it:
        (the next GEMM's input, the new residual)."""
        product = self.gemm(x, layer, name, partials=True)
        return fused_add_rmsnorm(product, res, self.norm_w, 1e-6)

    def run(self):
        res = self.res0
        h = rmsnorm(res, self.norm_w, 1e-6)
        for layer in range(self.layers):
            if self.context:
                attn = self.attention(h, layer)
            else:
                self.gemm(h, layer, "qkv")  # attention is fixed
                attn = self.attn
            h, res = self.add_norm(attn, res, layer, "o")
            w = self.w[layer]["gate_up"]
            if self.gated and supports(h, w, gated=True):
                act = linear(
                    h, w, gated=True, config=self.config(h, w, gated=True), early=self.w_early
                )
            else:
                act = silu_and_mul(self.gemm(h, layer, "gate_up"))
            h, res = self.add_norm(act, res, layer, "down")  # and the next input norm
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
    ap.add_argument(
        "--context",
        type=int,
        default=0,
        help="tokens per row of a whole decoder layer's attention (0: a fixed attention output)",
    )
    ap.add_argument(
        "--table-width", type=int, default=0, help="block-table width in tokens (default: N)"
    )
    ap.add_argument("--smoke", action="store_true", help="two layers on the CPU, interpreted")
    args = ap.parse_args()
    layers, dtype = LAYERS, torch.bfloat16
    if args.smoke:
        if DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs on the CPU under TRITON_INTERPRET=1")
        layers, dtype = 2, torch.float16
    elif DEVICE != "cuda":
        print("bench_layer_chain.py needs a CUDA GPU (or --smoke); nothing to do here")
        return
    what = f"a whole layer at {args.context} tokens of context" if args.context else "no attention"
    widths = [max(18, len(mode) + 2) for mode in args.modes]
    header = "".join(f"{mode:>{w}}" for mode, w in zip(args.modes, widths))
    print(f"{'M':>5}{header}   (us per layer, {what})")
    for m in args.m:
        row, ref = [], None
        for mode in args.modes:
            pdl._PDL = "+pdl" in mode
            chain = Chain(m, mode, args.context, args.table_width, layers, dtype)
            out = chain.run().float()
            if ref is None:
                ref = out
            else:
                check_close(f"M={m} {mode}", out, ref)
            if args.smoke:
                t0 = time.perf_counter()
                chain.run()
                row.append((time.perf_counter() - t0) * 1e6 / layers)
            else:
                row.append(graph_calls_us([chain.run]) / layers)
            del chain
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        print(f"{m:>5}" + "".join(f"{t:>{w}.2f}" for t, w in zip(row, widths)), flush=True)
    pdl._PDL = True


if __name__ == "__main__":
    main()
