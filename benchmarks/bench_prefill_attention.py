"""How fast is our paged flash prefill against standard attention, a naive Triton kernel and SDPA?

Causal attention, Qwen3-0.6B head shape (16 query heads, 8 KV heads, head_dim 128), bf16:
  * per sequence length: standard PyTorch attention (O(N^2) memory), a naive Triton kernel (scores
    and probabilities in device memory, O(N^2)), our flash prefill over a paged cache (shuffled
    blocks), and torch SDPA (flash / cuDNN backends) on contiguous K/V: TFLOP/s and peak memory;
  * 16 x 1024 varlen batch;
  * 512 new tokens over a 4096-token cached prefix, paged vs the same work on contiguous K/V.
Causal FLOPs are counted as 4 * heads * head_dim * (keys each query sees), i.e. about 2 * N^2 *
heads * head_dim for a plain prompt (the masked half is not counted).

    python benchmarks/bench_prefill_attention.py [--plot] [--sweep] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from bench_common import (
    DEVICE,
    check_close,
    copy_bandwidth_gbs,
    device_info,
    empty_cache,
    maybe_pyplot,
    peak_memory_bytes,
    print_table,
    sync,
    time_ms,
    write_json,
)
from minivllm.kernels.flash_prefill import _prefill_attention
from naive_attention import naive_triton_attention, standard_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128
DTYPE = torch.bfloat16
# Tile configurations tried by --sweep: (block_m, block_n, num_warps, num_stages, select_lookup).
SWEEP = [
    None,
    (128, 32, 4, 3, True),
    (64, 64, 4, 3, True),
    (128, 32, 4, 4, True),
    (128, 32, 8, 3, True),
    (64, 32, 4, 3, True),
    (128, 64, 4, 3, True),
    (128, 64, 8, 2, False),
    (128, 32, 4, 3, False),
]
# block_size >= block_n: one block-table lookup per tile either way
SWEEP_LARGE_BLOCKS = [
    None,
    (128, 64, 4, 3, True),
    (128, 32, 4, 3, True),
    (64, 64, 4, 3, True),
    (128, 64, 8, 2, True),
]


# ---- naive Triton attention: S and P materialized in device memory (O(N^2)) ---------------------
def sdpa(q4, k4, v4, backend, **kwargs):
    """SDPA on [B, H, N, D] with KV heads already expanded; None when the backend refuses."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def call():
        with sdpa_kernel([which]):
            return torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, **kwargs)

    try:
        call()
        sync()
    except Exception as e:  # noqa: BLE001 -- the backend refuses these inputs (or this machine)
        print(f"sdpa {backend}: unavailable ({str(e).splitlines()[0][:100]})")
        return None
    return call


# ---- inputs ---------------------------------------------------------------------------------
def paged_cache(k, v, seq_lens, block_size, shuffle=True):
    """Copy contiguous per-sequence K/V ([sum(seq_lens), KVH, D]) into a paged pool."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    total = sum(blocks_per_seq)
    order = torch.randperm(total, device=DEVICE) if shuffle else torch.arange(total, device=DEVICE)
    shape = (total, block_size, k.shape[1], k.shape[2])
    k_cache = torch.zeros(shape, dtype=k.dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    block_tables = torch.full(
        (len(seq_lens), max(blocks_per_seq)), -1, dtype=torch.int32, device=DEVICE
    )
    used, start = 0, 0
    for b, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        ids = order[used : used + nb]
        block_tables[b, :nb] = ids.to(torch.int32)
        slots = (ids[:, None] * block_size + torch.arange(block_size, device=DEVICE)).flatten()[:n]
        k_cache.view(-1, *k.shape[1:])[slots] = k[start : start + n]
        v_cache.view(-1, *k.shape[1:])[slots] = v[start : start + n]
        used, start = used + nb, start + n
    return k_cache, v_cache, block_tables


def ours(q, k_cache, v_cache, q_lens, seq_lens, block_tables, scale, cfg=None):
    cu = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)
    kw = {}
    if cfg is not None:
        kw = {
            "block_m": cfg[0],
            "block_n": cfg[1],
            "num_warps": cfg[2],
            "num_stages": cfg[3],
            "select_lookup": cfg[4],
        }
    return lambda: _prefill_attention(
        q, k_cache, v_cache, cu, lens, block_tables, scale, max(q_lens), out=out, **kw
    )


def best_config(make_fn, flops, label, sweep):
    """Time each tile configuration; returns (best cfg, rows)."""
    rows, best = [], None
    for cfg in sweep:
        try:
            fn = make_fn(cfg)
            fn()
            sync()
            ms = time_ms(fn)
        except Exception as e:  # noqa: BLE001 -- out of shared memory and the like
            print(f"{label} {cfg}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            continue
        rows.append({"case": label, "config": str(cfg), "ms": ms, "tflops": flops / ms / 1e9})
        if best is None or ms < best[1]:
            best = (cfg, ms)
    print_table(rows, ["case", "config", "ms", "tflops"])
    return (best[0] if best else None), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--block-size", type=int, default=16, help="KV cache block size")
    parser.add_argument("--sweep", action="store_true", help="try several tile configurations")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--headline", type=int, default=4096, help="sequence length of the sweep")
    parser.add_argument("--varlen", default="16x1024", help="BATCHxLEN")
    parser.add_argument("--prefix", default="4096:512", help="PREFIX:NEW")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--naive-max", type=int, default=8192, help="longest O(N^2) run")
    parser.add_argument("--out", default="benchmarks/out/prefill_attention.json")
    args = parser.parse_args()
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    torch.manual_seed(0)
    h, kvh, d, bs = NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, args.block_size
    scale = d**-0.5
    info = device_info()
    info["copy_gbs"] = copy_bandwidth_gbs()
    print(info)
    sweep = SWEEP if args.sweep else [None]

    # Tile sweep on the headline case (one 4096-token prompt), paged with block_size and 256.
    n = args.headline
    q = torch.randn(n, h, d, device=DEVICE, dtype=DTYPE)
    k = torch.randn(n, kvh, d, device=DEVICE, dtype=DTYPE)
    v = torch.randn(n, kvh, d, device=DEVICE, dtype=DTYPE)
    flops = 2.0 * h * d * n * n
    sweep_rows = []
    best_by_bs = {}
    for block_size in sorted({bs, 256}):
        kc, vc, bt = paged_cache(k, v, [n], block_size)
        this_sweep = sweep if block_size < 128 or not args.sweep else SWEEP_LARGE_BLOCKS
        cfg, rows = best_config(
            lambda c, kc=kc, vc=vc, bt=bt: ours(q, kc, vc, [n], [n], bt, scale, c),
            flops,
            f"{n} bs{block_size}",
            this_sweep,
        )
        best_by_bs[block_size] = cfg
        sweep_rows += rows
    cfg = best_by_bs[bs]
    print(f"tile config used below: {cfg} (None = launcher default)")

    rows = []
    for n in [int(x) for x in args.seq_lens.split(",")]:
        q = torch.randn(n, h, d, device=DEVICE, dtype=DTYPE)
        k = torch.randn(n, kvh, d, device=DEVICE, dtype=DTYPE)
        v = torch.randn(n, kvh, d, device=DEVICE, dtype=DTYPE)
        flops = 2.0 * h * d * n * n
        kc, vc, bt = paged_cache(k, v, [n], bs)
        q4 = q.transpose(0, 1)[None]
        k4 = k.repeat_interleave(h // kvh, dim=1).transpose(0, 1)[None].contiguous()
        v4 = v.repeat_interleave(h // kvh, dim=1).transpose(0, 1)[None].contiguous()
        impls = {"flash_prefill (ours, paged)": ours(q, kc, vc, [n], [n], bt, scale, cfg)}
        if n == args.headline and cfg is not None:
            impls["flash_prefill (ours, paged, launcher default)"] = ours(
                q, kc, vc, [n], [n], bt, scale
            )
        for backend in ("flash", "cudnn"):
            fn = sdpa(q4, k4, v4, backend, is_causal=True, scale=scale)
            if fn is not None:
                impls[f"sdpa {backend} (contiguous)"] = fn
        if n <= args.naive_max:
            impls["torch standard O(N^2)"] = lambda q=q, k=k, v=v: standard_attention(
                q, k, v, scale
            )
            impls["triton naive O(N^2)"] = lambda q=q, k=k, v=v: naive_triton_attention(
                q, k, v, scale
            )
        expect = None
        for name, fn in impls.items():
            got = fn()
            got = got[0].transpose(0, 1) if got.dim() == 4 else got
            if expect is None:
                expect = got.clone()
                err = 0.0
            else:
                err = check_close(f"{name} n={n}", got, expect)
            ms = time_ms(fn)
            ms_w = time_ms(fn, flush="write")
            mem = peak_memory_bytes(fn)
            rows.append(
                {
                    "case": f"causal {n}",
                    "impl": name,
                    "seq_len": n,
                    "ms": ms,
                    "tflops": flops / ms / 1e9,
                    "tflops_wflush": flops / ms_w / 1e9,
                    "peak_mib": mem / 2**20,
                    "rel_err": err,
                }
            )
            del got
        del impls, kc, vc, q4, k4, v4
        empty_cache()

    # 16 x 1024 varlen (equal lengths, so SDPA can run it as one batch)
    b, n = (int(x) for x in args.varlen.split("x"))
    q = torch.randn(b * n, h, d, device=DEVICE, dtype=DTYPE)
    k = torch.randn(b * n, kvh, d, device=DEVICE, dtype=DTYPE)
    v = torch.randn(b * n, kvh, d, device=DEVICE, dtype=DTYPE)
    flops = b * 2.0 * h * d * n * n
    kc, vc, bt = paged_cache(k, v, [n] * b, bs)
    varlen_cfg, vrows = best_config(
        lambda c: ours(q, kc, vc, [n] * b, [n] * b, bt, scale, c), flops, f"{b}x{n}", sweep
    )
    sweep_rows += vrows
    q4 = q.view(b, n, h, d).transpose(1, 2)
    k4 = k.view(b, n, kvh, d).repeat_interleave(h // kvh, dim=2).transpose(1, 2).contiguous()
    v4 = v.view(b, n, kvh, d).repeat_interleave(h // kvh, dim=2).transpose(1, 2).contiguous()
    impls = {
        "flash_prefill (ours, paged)": ours(q, kc, vc, [n] * b, [n] * b, bt, scale, varlen_cfg)
    }
    for backend in ("flash", "cudnn"):
        fn = sdpa(q4, k4, v4, backend, is_causal=True, scale=scale)
        if fn is not None:
            impls[f"sdpa {backend} (contiguous)"] = fn
    expect = None
    for name, fn in impls.items():
        got = fn()
        got = got.transpose(1, 2).reshape(b * n, h, d) if got.dim() == 4 else got
        err = 0.0 if expect is None else check_close(name, got, expect)
        expect = got.clone() if expect is None else expect
        ms, ms_w = time_ms(fn), time_ms(fn, flush="write")
        rows.append(
            {
                "case": f"varlen {b}x{n}",
                "impl": name,
                "seq_len": n,
                "ms": ms,
                "tflops": flops / ms / 1e9,
                "tflops_wflush": flops / ms_w / 1e9,
                "peak_mib": peak_memory_bytes(fn) / 2**20,
                "rel_err": err,
            }
        )
    del kc, vc, q4, k4, v4
    empty_cache()

    # 512 new tokens over a 4096-token cached prefix: paged vs contiguous K/V
    prefix, new = (int(x) for x in args.prefix.split(":"))
    total = prefix + new
    q = torch.randn(new, h, d, device=DEVICE, dtype=DTYPE)
    k = torch.randn(total, kvh, d, device=DEVICE, dtype=DTYPE)
    v = torch.randn(total, kvh, d, device=DEVICE, dtype=DTYPE)
    flops = 4.0 * h * d * (new * prefix + new * (new + 1) / 2)
    kc, vc, bt = paged_cache(k, v, [total], bs)
    prefix_cfg, prows = best_config(
        lambda c: ours(q, kc, vc, [new], [total], bt, scale, c),
        flops,
        f"{new} over {prefix}",
        sweep,
    )
    sweep_rows += prows
    # contiguous: the whole context in one cache block, in order
    big = 1 << math.ceil(math.log2(total))
    kc1 = torch.zeros(1, big, kvh, d, device=DEVICE, dtype=DTYPE)
    vc1 = torch.zeros_like(kc1)
    kc1[0, :total], vc1[0, :total] = k, v
    bt1 = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    impls = {
        "flash_prefill (ours, paged)": ours(q, kc, vc, [new], [total], bt, scale, prefix_cfg),
        "flash_prefill (ours, contiguous)": ours(
            q, kc1, vc1, [new], [total], bt1, scale, prefix_cfg
        ),
    }
    try:
        from torch.nn.attention.bias import causal_lower_right

        q4 = q.transpose(0, 1)[None]
        k4 = k.repeat_interleave(h // kvh, dim=1).transpose(0, 1)[None].contiguous()
        v4 = v.repeat_interleave(h // kvh, dim=1).transpose(0, 1)[None].contiguous()
        bias = causal_lower_right(new, total)
        for backend in ("flash", "cudnn"):
            fn = sdpa(q4, k4, v4, backend, attn_mask=bias, scale=scale)
            if fn is not None:
                impls[f"sdpa {backend} (contiguous)"] = fn
    except ImportError:
        print("no causal_lower_right in this torch: SDPA skipped for the prefix case")
    expect = None
    for name, fn in impls.items():
        got = fn()
        got = got[0].transpose(0, 1) if got.dim() == 4 else got
        err = 0.0 if expect is None else check_close(name, got, expect)
        expect = got.clone() if expect is None else expect
        ms, ms_w = time_ms(fn), time_ms(fn, flush="write")
        rows.append(
            {
                "case": f"{new} over {prefix} prefix",
                "impl": name,
                "seq_len": total,
                "ms": ms,
                "tflops": flops / ms / 1e9,
                "tflops_wflush": flops / ms_w / 1e9,
                "peak_mib": peak_memory_bytes(fn) / 2**20,
                "rel_err": err,
            }
        )

    print_table(rows, ["case", "impl", "ms", "tflops", "tflops_wflush", "peak_mib", "rel_err"])
    write_json(
        args.out,
        {
            "info": info,
            "block_size": bs,
            "config": str(cfg),
            "best_by_block_size": {str(k): str(c) for k, c in best_by_bs.items()},
            "rows": rows,
            "sweep": sweep_rows,
        },
    )
    if args.plot:
        plot(rows, os.path.splitext(args.out)[0] + ".png", info)


def plot(rows, path, info):
    plt = maybe_pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    causal = [r for r in rows if r["case"].startswith("causal")]
    for impl in dict.fromkeys(r["impl"] for r in causal):
        pts = [r for r in causal if r["impl"] == impl]
        xs = [r["seq_len"] for r in pts]
        ax1.plot(xs, [r["tflops"] for r in pts], marker="o", label=impl)
        ax2.plot(xs, [r["peak_mib"] for r in pts], marker="o", label=impl)
    for ax, ylabel in ((ax1, "TFLOP/s"), (ax2, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (causal, one sequence)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if all(r["peak_mib"] > 0 for r in causal):
        ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    dtype = str(DTYPE).split(".")[-1]
    fig.suptitle(f"prefill attention, {dtype}, 16q/8kv heads, d=128 — {info['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
