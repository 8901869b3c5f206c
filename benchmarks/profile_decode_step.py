"""Where one decode step's time goes, host and GPU (issue 5).

Drives the engine's step pieces by hand with N sequences decoding (Qwen3-0.6B shape, dummy
weights, bf16) and times each phase with a device sync after it, so each phase's own cost shows:
schedule (C++), prepare (fill the staging buffer + one upload), forward (graph replay or eager
launches, then the GPU work), logits + sample, read back, update (C++). Then a torch.profiler
table of the top GPU kernels over a few unsynchronised steps.

    python benchmarks/profile_decode_step.py --running 256 8 --out bench_out/profile.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from minivllm import LLM
from minivllm.demo import make_demo_checkpoint

PHASES = ("schedule", "prepare", "forward_launch", "forward_gpu", "sample", "read_back", "update")


def profile(llm: LLM, num_running: int, context: int, steps: int) -> dict:
    sched, runner = llm.scheduler, llm.model_runner
    rng = np.random.default_rng(0)
    base = 1 << 40
    for i in range(num_running):
        sched.add_request(base + i, rng.integers(0, 10000, context).tolist(), 10**4,
                          ignore_eos=True, temperature=0.6, seed=i)
    while True:  # prefill
        batch = runner.schedule(sched)
        sched.update(runner.execute(batch, staged=True))
        if batch.num_decodes == batch.num_seqs:
            break
    times = {p: [] for p in PHASES}

    def clock() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    with torch.inference_mode():
        for _ in range(steps):
            t0 = clock()
            batch = runner.schedule(sched)  # the core writes into the staging buffer
            t1 = clock()
            inputs = runner.prepare(batch, staged=True)
            t2 = clock()
            hidden = runner.run_model(inputs)
            t3 = time.perf_counter()
            t3s = clock()
            logits = runner.model.compute_logits(hidden[inputs.logits_indices])
            ids = runner.sampler(logits, inputs.sampling)
            t4 = clock()
            ids_np = ids.cpu().numpy()
            t5 = clock()
            sched.update(ids_np)
            t6 = clock()
            for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t3s - t3, t4 - t3s, t5 - t4,
                                         t6 - t5)):
                times[name].append(dt * 1e6)

    # The pieces of prepare and forward_launch on their own (host clocks, synced around).
    buf = runner.buffers
    extras = {"upload_us": [], "replay_launch_us": [], "replay_total_us": []}
    batch = runner.schedule(sched)
    inputs = runner.prepare(batch, staged=True)
    for _ in range(steps):
        t0 = clock()
        buf.upload()
        t1 = clock()
        if runner.graph_runner is not None:
            runner.graph_runner.replay(int(batch.num_decodes))
            t2 = time.perf_counter()
            t3 = clock()
            extras["replay_launch_us"].append((t2 - t1) * 1e6)
            extras["replay_total_us"].append((t3 - t1) * 1e6)
        extras["upload_us"].append((t1 - t0) * 1e6)
    sched.update(runner.execute(batch, staged=True))

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            batch = runner.schedule(sched)
            sched.update(runner.execute(batch, staged=True))
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    gaps = gpu_gaps(prof)

    # Host cost of launching each captured graph (the GPU drained first, so nothing queues).
    launch_by_bucket = {}
    if runner.graph_runner is not None:
        for bs in runner.graph_runner.batch_sizes:
            samples = []
            for _ in range(10):
                clock()
                t0 = time.perf_counter()
                runner.graph_runner.replay(bs)
                samples.append((time.perf_counter() - t0) * 1e6)
            clock()
            launch_by_bucket[bs] = float(np.median(samples))
    for i in range(num_running):
        sched.abort(base + i)
    return {
        "running": num_running,
        "context": context,
        "graphs": runner.graph_runner is not None,
        "median_us": {p: float(np.median(v)) for p, v in times.items()},
        "extras_median_us": {k: float(np.median(v)) for k, v in extras.items() if v},
        "staging_bytes": int(buf.host.numel() * buf.host.element_size()),
        "kernel_table": table,
        "gpu_gaps": gaps,
        "replay_launch_us_by_bucket": launch_by_bucket,
    }


def gpu_gaps(prof) -> dict:
    """Idle time between consecutive GPU activities of the profiled steps, summed by the pair
    (kernel before, kernel after); gaps above 50 us count as "between steps" (host work)."""
    events = sorted(
        (e.time_range.start, e.time_range.end, e.name[:40])
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    small, large, pairs = [], [], {}
    for (s0, e0, n0), (s1, _, n1) in itertools.pairwise(events):
        gap = s1 - max(e0, s0)
        if gap <= 0:
            continue
        (large if gap > 50 else small).append(gap)
        key = f"{n0} -> {n1}"
        total, count = pairs.get(key, (0.0, 0))
        pairs[key] = (total + gap, count + 1)
    top = sorted(pairs.items(), key=lambda kv: -kv[1][0])[:10]
    return {
        "num_gpu_events": len(events),
        "small_gaps_us_total": float(sum(small)),
        "small_gaps_count": len(small),
        "large_gaps_us_total": float(sum(large)),
        "large_gaps_count": len(large),
        "top_pairs_us": [(k, round(t, 1), c) for k, (t, c) in top],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--running", type=int, nargs="+", default=[256, 8])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--out", default="benchmarks/out/profile_decode_step.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_demo_checkpoint(Path(tmp) / "m", "qwen3-0.6b", write_weights=False)
        llm = LLM(str(model_dir), dtype="bfloat16", load_format="dummy", max_model_len=4096,
                  enforce_eager=args.enforce_eager)
        results = [profile(llm, n, args.context, args.steps) for n in args.running]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    for r in results:
        print(f"\n--- {r['running']} running, context {r['context']}, graphs={r['graphs']}")
        print(r["kernel_table"])
        print("extras (median us):", r["extras_median_us"], "staging bytes:", r["staging_bytes"])
        g = r["gpu_gaps"]
        print(f"GPU gaps over 5 steps: {g['num_gpu_events']} events; "
              f"{g['small_gaps_count']} gaps <= 50 us sum {g['small_gaps_us_total']:.0f} us; "
              f"{g['large_gaps_count']} gaps > 50 us sum {g['large_gaps_us_total']:.0f} us")
        for pair in g["top_pairs_us"]:
            print("   gap", pair)
        print("replay launch us by bucket:", {k: round(v) for k, v in
                                              r["replay_launch_us_by_bucket"].items()})
    print(f"\n{'running':>8}" + "".join(f"{p:>15}" for p in PHASES) + f"{'total':>10}")
    for r in results:
        m = r["median_us"]
        print(f"{r['running']:>8}" + "".join(f"{m[p]:>15.0f}" for p in PHASES)
              + f"{sum(m.values()):>10.0f}")


if __name__ == "__main__":
    main()
