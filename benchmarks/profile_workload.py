"""Where does the GPU time of the throughput workload go, by kind of step and kind of kernel?

Runs bench_throughput's workload (workload.py: nano-vllm's bench on Qwen3-0.6B's shape, or with
--model-shape 8b / 14b Qwen3-8B's / 14B's, dummy weights, bf16) once under torch.profiler (CUDA activity only, so host timings are not inflated
much) and splits the GPU timeline into steps at each step's one staging upload (the pinned
host-to-device copy that starts every step). For each kind of step it prints the wall time on the
GPU timeline, the time in kernels by category (decode attention, prefill attention, GEMMs,
norms, rotary, activation, sampler, copies) and the idle time; then the top kernels of each kind.
With programmatic dependent launch a kernel's interval starts when it is scheduled, before it
waits, so the categories overlap: compare the wall and idle columns across runs. Each step also
counts the allocator's cudaMalloc calls (and retries) inside its launch and the Triton kernels
compiled since the last one. A median decode step of each kind lists its own kernels (launches
and time of each), as do the first step with prefill, the three slowest and a median one of the
slowest one's size: what makes one step slower than its peers.
--smoke: the workload's first requests on a tiny model on the CPU, steps recorded, no GPU
timeline (a check of the script).

    python benchmarks/profile_workload.py [--model-shape 0.6b|8b|14b] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from bench_common import device_info
from minivllm import LLM, SamplingParams
from step_breakdown import step_kind
from steps import StepRecord, StepRecorder
from workload import (
    MODEL_SHAPES,
    engine_args,
    make_model_dir,
    nano_vllm_workload,
    smoke_workload,
)

CATEGORIES = (
    ("decode attn", ("_paged_decode",)),
    ("prefill attn", ("_flash_prefill",)),
    ("gemm", ("nvjet", "gemm", "cutlass", "splitK", "xmma", "_linear_kernel")),
    ("rmsnorm", ("_rmsnorm",)),
    ("qk-norm+rope+kv", ("_qk_norm_rope", "_kv_store", "_store_kv")),
    ("silu*mul", ("_silu",)),
    ("sampler", ("_chunk_stats", "_sample_chunks", "_resolve_placeholders")),
    ("copies", ("Memcpy", "Memset")),
)
SHORT = {
    "decode attn": "dec-attn",
    "prefill attn": "pre-attn",
    "qk-norm+rope+kv": "rope",
    "silu*mul": "silu",
}


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


def gpu_timeline(prof: Any, records: list[StepRecord]) -> dict[str, Any]:
    """GPU events split into steps at each upload, summed by kind of step and kernel category."""
    events = sorted(
        (e.start_ns(), e.start_ns() + e.duration_ns(), e.name())
        for e in prof.profiler.kineto_results.events()
        if e.device_type() == torch.autograd.DeviceType.CUDA
    )
    uploads = [i for i, ev in enumerate(events) if "Memcpy HtoD" in ev[2]]
    print(f"{len(events)} GPU events, {len(uploads)} uploads, {len(records)} launches")
    if len(uploads) != len(records):
        print("warning: uploads != launches; steps are matched in order and may drift")
    cats = [c for c, _ in CATEGORIES] + ["other"]
    kinds: dict[str, dict[str, float]] = {}
    names: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    step_ms = []  # per step: (GPU segment, kernel time) in ms
    bounds = []  # per step: its events[lo:hi]
    for s in range(min(len(uploads), len(records))):
        lo = uploads[s]
        hi = uploads[s + 1] if s + 1 < len(uploads) else len(events)
        seg = events[lo:hi]
        end = events[hi][0] if hi < len(events) else max(e for _, e, _ in seg)
        kind = step_kind(records[s].num_tokens, records[s].num_decodes)
        k = kinds.setdefault(
            kind, {"steps": 0, "wall_s": 0.0, "busy_s": 0.0, **dict.fromkeys(cats, 0.0)}
        )
        k["steps"] += 1
        k["wall_s"] += (end - seg[0][0]) * 1e-9
        step_ms.append(((end - seg[0][0]) * 1e-6, sum(b - a for a, b, _ in seg) * 1e-6))
        cur_s = cur_e = None
        for a, b, name in seg:
            k[category(name)] += (b - a) * 1e-9
            names[kind][name[:60]] += (b - a) * 1e-9
            if cur_e is None or a > cur_e:
                if cur_e is not None:
                    k["busy_s"] += (cur_e - cur_s) * 1e-9
                cur_s, cur_e = a, b
            else:
                cur_e = max(cur_e, b)
        if cur_e is not None:
            k["busy_s"] += (cur_e - cur_s) * 1e-9
        bounds.append((lo, hi))
    kinds["all"] = {
        c: sum(k[c] for k in kinds.values()) for c in ["steps", "wall_s", "busy_s", *cats]
    }
    top = {kd: sorted(v.items(), key=lambda x: -x[1])[:12] for kd, v in names.items()}
    step_kernels = [
        {
            "step": s,
            "why": why,
            "tokens": records[s].num_tokens,
            "decodes": records[s].num_decodes,
            "segment_ms": step_ms[s][0],
            "kernels": kernel_totals(events[slice(*bounds[s])]),
        }
        for s, why in steps_to_show(records[: len(step_ms)], [ms for ms, _ in step_ms])
    ]
    return {
        "kinds": kinds,
        "top_kernels": top,
        "step_gpu_ms": step_ms,
        "step_kernels": step_kernels,
    }


def steps_to_show(records: list[StepRecord], segment_ms: list[float]) -> list[tuple[int, str]]:
    """Steps worth a kernel list: a median decode step of each kind (its kernels one by one),
    and of the steps with prefill the first, the three slowest, and a typical one (the median)
    of the slowest one's size, to set beside it."""
    shown: dict[int, str] = {}
    kinds: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r.num_tokens == r.num_decodes:
            kinds[step_kind(r.num_tokens, r.num_decodes)].append(i)
    for kind, steps in sorted(kinds.items()):
        steps.sort(key=lambda i: segment_ms[i])
        shown[steps[len(steps) // 2]] = f"median {kind}"
    prefill = [i for i, r in enumerate(records) if r.num_tokens != r.num_decodes]
    if not prefill:
        return sorted(shown.items())
    slowest = sorted(prefill, key=lambda i: -segment_ms[i])[:3]
    shown[prefill[0]] = "first with prefill"
    for rank, i in enumerate(slowest):
        shown.setdefault(i, f"slowest #{rank + 1}")
    same_size = sorted(
        (
            i
            for i in prefill
            if records[i].num_tokens == records[slowest[0]].num_tokens and i not in shown
        ),
        key=lambda i: segment_ms[i],
    )
    if same_size:
        shown[same_size[len(same_size) // 2]] = "median of its size"
    return sorted(shown.items())


def kernel_totals(
    events: list[tuple[int, int, str]], top: int = 16
) -> list[tuple[str, int, float]]:
    """(name, launches, ms) of a step's kernels, the longest in total first."""
    total: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for a, b, name in events:
        total[name[:70]][0] += 1
        total[name[:70]][1] += (b - a) * 1e-6
    ranked = sorted(total.items(), key=lambda x: -x[1][1])[:top]
    return [(name, int(n), ms) for name, (n, ms) in ranked]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out/profile_workload.json")
    ap.add_argument("--model-shape", default="0.6b", choices=list(MODEL_SHAPES))
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, no GPU timeline")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        raise SystemExit("profile_workload needs a CUDA GPU (or --smoke)")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(tmp, args.model_shape, smoke=args.smoke)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        llm = LLM(
            str(model_dir),
            max_model_len=4096,
            enforce_eager=args.enforce_eager,
            **engine_args(args.smoke),
        )
    if args.smoke:
        prompts, max_tokens = smoke_workload(vocab)
    else:
        prompts, max_tokens = nano_vllm_workload(args.num_seqs)
    warm = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=16)
    llm.generate([p[:128][::-1] for p in prompts[:8]], warm, use_tqdm=False)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in max_tokens]
    with StepRecorder(llm, watch=True) as recorder:
        profiler = profile(activities=[ProfilerActivity.CUDA]) if cuda else contextlib.nullcontext()
        with profiler as prof:
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    records = recorder.records
    out: dict[str, Any] = {**device_info(), "wall_s": wall}
    out["allocator"] = {
        "cuda_mallocs": sum(r.cuda_mallocs for r in records),
        "alloc_retries": sum(r.alloc_retries for r in records),
    }
    out["triton_compiles"] = [[i, name] for i, r in enumerate(records) for name in r.compiles]
    print(
        f"during the run: {out['allocator']['cuda_mallocs']} cudaMalloc, "
        f"{out['allocator']['alloc_retries']} allocator retries (cudaFree + retry), "
        f"{len(out['triton_compiles'])} Triton compiles"
    )
    if cuda:
        out.update(gpu_timeline(prof, records))
    print(
        "first steps, every step with prefill and every step that allocated or compiled: step, "
        "tokens, decodes, launched at ms, host ms in launch, cudaMalloc, retries[, GPU segment "
        "ms, kernel ms][, compiled]"
    )
    step_gpu_ms = out.get("step_gpu_ms", [])
    for i, r in enumerate(records):
        if i < 24 or r.num_tokens != r.num_decodes or r.cuda_mallocs or r.compiles:
            gpu = "  ".join(f"{ms:.2f}" for ms in step_gpu_ms[i]) if i < len(step_gpu_ms) else ""
            at, host = (r.launched - t0) * 1e3, r.host_s * 1e3
            print(
                f"   {i}  {r.num_tokens}  {r.num_decodes}  {at:.2f}  {host:.2f}  "
                f"{r.cuda_mallocs}  {r.alloc_retries}  {gpu}  {' '.join(r.compiles)}"
            )
    for st in out.get("step_kernels", []):
        print(
            f"\nstep {st['step']} ({st['why']}): {st['tokens']} tokens, {st['decodes']} decodes, "
            f"GPU segment {st['segment_ms']:.2f} ms; its kernels (launches, ms):"
        )
        for name, n, ms in st["kernels"]:
            print(f"   {ms:8.3f}  {n:5d}  {name}")
    llm.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    if not cuda:
        print(f"\n{len(records)} steps in {wall:.2f} s (no GPU timeline on the CPU)")
        return
    for kd, top in out["top_kernels"].items():
        print(f"\n{kd}: top kernels (s)")
        for name, s in top:
            print(f"   {s:8.4f}  {name}")
    cats = [c for c, _ in CATEGORIES] + ["other"]
    print(
        f"\nGPU timeline by kind of step (seconds; wall = upload to next upload), run {wall:.2f} s"
    )
    print(
        f"{'kind':<16}{'steps':>6}{'wall':>7}{'idle':>7}"
        + "".join(f"{SHORT.get(c, c):>9}" for c in cats)
    )
    for kd, k in sorted(out["kinds"].items()):
        print(
            f"{kd:<16}{k['steps']:>6.0f}{k['wall_s']:>7.2f}{k['wall_s'] - k['busy_s']:>7.2f}"
            + "".join(f"{k[c]:>9.3f}" for c in cats)
        )


if __name__ == "__main__":
    main()
