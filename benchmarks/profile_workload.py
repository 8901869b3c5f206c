"""Where does the GPU time of the throughput workload go, by kind of step and kind of kernel?

Runs bench_throughput's workload (workload.py: nano-vllm's bench on Qwen3-0.6B's shape, dummy
weights, bf16) once under torch.profiler (CUDA activity only, so host timings are not inflated
much) and splits the GPU timeline into steps at each step's one staging upload (the pinned
host-to-device copy that starts every step). For each kind of step it prints the wall time on the
GPU timeline, the time in kernels by category (decode attention, prefill attention, GEMMs,
norms, rotary, activation, sampler, copies) and the idle time; then the top kernels of each kind.
With programmatic dependent launch a kernel's interval starts when it is scheduled, before it
waits, so the categories overlap: compare the wall and idle columns across runs.
--smoke: the workload's first requests on a tiny model on the CPU, steps recorded, no GPU
timeline (a check of the script).

    python benchmarks/profile_workload.py [--out benchmarks/out/profile_workload.json]
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
from bench_throughput import step_kind
from minivllm import LLM, SamplingParams
from steps import StepRecord, StepRecorder
from workload import engine_args, make_model_dir, nano_vllm_workload, smoke_workload

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
    kinds["all"] = {
        c: sum(k[c] for k in kinds.values()) for c in ["steps", "wall_s", "busy_s", *cats]
    }
    top = {kd: sorted(v.items(), key=lambda x: -x[1])[:12] for kd, v in names.items()}
    return {"kinds": kinds, "top_kernels": top, "step_gpu_ms": step_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out/profile_workload.json")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, no GPU timeline")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        raise SystemExit("profile_workload needs a CUDA GPU (or --smoke)")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(tmp, smoke=args.smoke)
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
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0
    with StepRecorder(llm) as recorder:
        profiler = profile(activities=[ProfilerActivity.CUDA]) if cuda else contextlib.nullcontext()
        with profiler as prof:
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    records = recorder.records
    out: dict[str, Any] = {**device_info(), "wall_s": wall}
    if cuda:
        out["allocator_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries
        print(f"allocator retries (cudaFree + retry) during the run: {out['allocator_retries']}")
        out.update(gpu_timeline(prof, records))
    print(
        "first steps and every step with prefill: step, tokens, decodes, launched at ms, host ms "
        "in launch[, GPU segment ms, kernel ms]"
    )
    step_gpu_ms = out.get("step_gpu_ms", [])
    for i, r in enumerate(records):
        if i < 24 or r.num_tokens != r.num_decodes:
            gpu = "  ".join(f"{ms:.2f}" for ms in step_gpu_ms[i]) if i < len(step_gpu_ms) else ""
            at, host = (r.launched - t0) * 1e3, r.host_s * 1e3
            print(f"   {i}  {r.num_tokens}  {r.num_decodes}  {at:.2f}  {host:.2f}  {gpu}")
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
