"""Where the GPU time of the whole throughput workload goes, by kind of step and kind of kernel.

Runs bench_throughput's workload (nano-vllm bench, Qwen3-0.6B shape, dummy weights, bf16) once
under torch.profiler (CUDA activity only, so host timings are not inflated much) and splits the
GPU timeline into steps at each step's one staging upload (the pinned host-to-device copy that
starts every step). For each kind of step it prints the wall time on the GPU timeline, the time
in kernels by category (decode attention, prefill attention, GEMMs, norms, rotary, activation,
sampler, copies) and the idle time; then the top kernels of each kind.

    python benchmarks/profile_workload.py --out bench_out/profile_workload.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from minivllm import LLM, SamplingParams
from minivllm.demo import make_demo_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from bench_throughput import nano_vllm_workload

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


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


def step_kind(tokens: int, decodes: int) -> str:
    if tokens != decodes:
        return "prefill / mixed"
    for lo, hi in ((1, 16), (17, 64), (65, 160), (161, 256)):
        if decodes <= hi:
            return f"decode {lo}-{hi}"
    return "decode >256"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out/profile_workload.json")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    prompts, max_tokens = nano_vllm_workload(args.num_seqs)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_demo_checkpoint(Path(tmp) / "m", "qwen3-0.6b", write_weights=False)
        llm = LLM(str(model_dir), dtype="bfloat16", load_format="dummy", max_model_len=4096,
                  seed=0, enforce_eager=args.enforce_eager)
        warm = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=16)] * 8
        llm.generate([p[:128] for p in prompts[:8]], warm, use_tqdm=False)
        runner = llm.model_runner
        real_launch = runner.launch
        launches: list[tuple[int, int]] = []
        host_ms: list[tuple[float, float]] = []  # (launch start since t0, host ms in launch)

        def recording_launch(batch, staged: bool = False):
            launches.append((int(batch.num_tokens), int(batch.num_decodes)))
            start = time.perf_counter()
            result = real_launch(batch, staged)
            host_ms.append(((start - t0) * 1e3, (time.perf_counter() - start) * 1e3))
            return result

        runner.launch = recording_launch
        params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n)
                  for n in max_tokens]
        torch.cuda.synchronize()
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, params, use_tqdm=False)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        del runner.launch
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries
    t1 = time.perf_counter()
    events = sorted(
        (e.start_ns(), e.start_ns() + e.duration_ns(), e.name())
        for e in prof.profiler.kineto_results.events()
        if e.device_type() == torch.autograd.DeviceType.CUDA
    )
    uploads = [i for i, ev in enumerate(events) if "Memcpy HtoD" in ev[2]]
    print(f"{len(events)} GPU events, {len(uploads)} uploads, {len(launches)} launches; "
          f"wall {wall:.2f} s; parsed in {time.perf_counter() - t1:.1f} s")
    if len(uploads) != len(launches):
        print("warning: uploads != launches; steps are matched in order and may drift")
    print(f"allocator retries (cudaFree + retry) during the run: {retries}")
    n = min(len(uploads), len(launches))
    per_step = []
    cats = [c for c, _ in CATEGORIES] + ["other"]
    kinds: dict[str, dict] = {}
    names: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for s in range(n):
        lo = uploads[s]
        hi = uploads[s + 1] if s + 1 < len(uploads) else len(events)
        seg = events[lo:hi]
        start = seg[0][0]
        end = events[hi][0] if hi < len(events) else max(e for _, e, _ in seg)
        kind = step_kind(*launches[s])
        k = kinds.setdefault(kind, {"steps": 0, "wall_s": 0.0, "busy_s": 0.0,
                                    **{c: 0.0 for c in cats}})
        k["steps"] += 1
        k["wall_s"] += (end - start) * 1e-9
        cur_s = cur_e = None
        for a, b, name in seg:
            d = (b - a) * 1e-9
            k[category(name)] += d
            names[kind][name[:60]] += d
            if cur_e is None or a > cur_e:
                if cur_e is not None:
                    k["busy_s"] += (cur_e - cur_s) * 1e-9
                cur_s, cur_e = a, b
            else:
                cur_e = max(cur_e, b)
        if cur_e is not None:
            k["busy_s"] += (cur_e - cur_s) * 1e-9
        if s < 24 or kind == "prefill / mixed":
            per_step.append((s, *launches[s], *host_ms[s], (end - start) * 1e-6,
                             sum(b - a for a, b, _ in seg) * 1e-6))
    print("first steps and every prefill/mixed step: step, tokens, decodes, launch at ms, host ms "
          "in launch, GPU segment ms, kernel ms")
    for row in per_step:
        print("   " + "  ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row))
    total = {c: sum(k[c] for k in kinds.values()) for c in ["steps", "wall_s", "busy_s", *cats]}
    kinds["all"] = total
    out = {"wall_s": wall, "kinds": kinds,
           "top_kernels": {kd: sorted(v.items(), key=lambda x: -x[1])[:12]
                           for kd, v in names.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for kd, top in out["top_kernels"].items():
        print(f"\n{kd}: top kernels (s)")
        for name, s in top:
            print(f"   {s:8.4f}  {name}")
    short = {"decode attn": "dec-attn", "prefill attn": "pre-attn", "qk-norm+rope+kv": "rope",
             "silu*mul": "silu"}
    print(f"\nGPU timeline by kind of step (seconds; wall = upload to next upload), "
          f"run {wall:.2f} s")
    print(f"{'kind':<16}{'steps':>6}{'wall':>7}{'idle':>7}"
          + "".join(f"{short.get(c, c):>9}" for c in cats))
    for kd in sorted(kinds):
        k = kinds[kd]
        print(f"{kd:<16}{k['steps']:>6}{k['wall_s']:>7.2f}{k['wall_s'] - k['busy_s']:>7.2f}"
              + "".join(f"{k[c]:>9.3f}" for c in cats))


if __name__ == "__main__":
    main()
