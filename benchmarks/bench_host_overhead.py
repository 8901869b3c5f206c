"""Host overhead per engine step: schedule() + update() of the C++ core vs its Python twin.

The nano-vllm bench workload (random.seed(0); 256 requests; prompt lengths uniform 100..1024 with
ids uniform 0..10000; max_tokens uniform 100..1024; ignore_eos), driven to completion with
synthetic sampled tokens (no model), once per core and block size, in the same process. A step's
time is schedule() (including every Batch array) plus update(); making the sampled-token array is
not timed. Decode steps are bucketed by their number of running sequences (256, ~64, ~16);
"prefill" is every step that carries prompt tokens.

    python benchmarks/bench_host_overhead.py [--block-sizes 256 16] [--repeats 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from minivllm._core import Scheduler as CppScheduler
from minivllm.engine.reference import Scheduler as PyScheduler

# Decode buckets: label -> accepted numbers of running sequences.
DECODE_BUCKETS = {"decode@256": (256, 256), "decode@64": (56, 72), "decode@16": (12, 20)}


def make_workload(num_seqs: int = 256, seed: int = 0) -> list[tuple[list[int], int]]:
    """nano-vllm's bench.py, draw for draw."""
    random.seed(seed)
    max_input_len = max_output_len = 1024
    prompts = [
        [random.randint(0, 10000) for _ in range(random.randint(100, max_input_len))]
        for _ in range(num_seqs)
    ]
    max_tokens = [random.randint(100, max_output_len) for _ in range(num_seqs)]
    return list(zip(prompts, max_tokens))


def run(
    scheduler_cls: Any,
    workload: list[tuple[list[int], int]],
    block_size: int,
    max_num_batched_tokens: int,
) -> dict[str, Any]:
    max_model_len = 4096
    num_blocks = sum(-(-(len(p) + m) // block_size) for p, m in workload)  # holds everything
    sched = scheduler_cls(num_blocks, block_size, 256, max_num_batched_tokens, max_model_len)
    for seq_id, (prompt, max_tokens) in enumerate(workload):
        sched.add_request(seq_id, prompt, max_tokens, ignore_eos=True, temperature=0.6)
    rng = np.random.default_rng(0)
    token_pool = rng.integers(0, 10000, size=1 << 16, dtype=np.int64)
    steps: list[tuple[str, int, float]] = []  # (kind, num_seqs, microseconds)
    outputs: dict[int, list[int]] = {}
    offset = 0
    while sched.has_unfinished():
        t0 = time.perf_counter_ns()
        batch = sched.schedule()
        t1 = time.perf_counter_ns()
        num_sampled = len(batch.sample_seq_ids)
        if offset + num_sampled > len(token_pool):
            offset = 0
        tokens = token_pool[offset : offset + num_sampled]
        offset += num_sampled
        t2 = time.perf_counter_ns()
        finished = sched.update(tokens)
        t3 = time.perf_counter_ns()
        num_seqs = len(batch.seq_ids)
        kind = "decode" if batch.num_decodes == num_seqs else "prefill"
        steps.append((kind, num_seqs, ((t1 - t0) + (t3 - t2)) / 1000))
        for seq_id, _, token_ids in finished:
            outputs[seq_id] = list(token_ids)
    assert sched.num_free_blocks == num_blocks
    return {"steps": steps, "outputs": outputs, "stats": sched.stats}


def summarize(steps: list[tuple[str, int, float]]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = {"prefill": [t for k, _, t in steps if k == "prefill"]}
    for label, (lo, hi) in DECODE_BUCKETS.items():
        groups[label] = [t for k, n, t in steps if k == "decode" and lo <= n <= hi]
    out = {}
    for label, times in groups.items():
        if times:
            out[label] = {
                "num_steps": len(times),
                "median_us": statistics.median(times),
                "p99_us": float(np.percentile(times, 99)),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[256, 16])
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the workload per core")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/host_overhead.json"))
    args = parser.parse_args()

    workload = make_workload()
    results: dict[str, Any] = {
        "workload": "nano-vllm bench: seed 0, 256 requests, prompt 100..1024, max_tokens 100..1024",
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}",
        "block_sizes": {},
    }
    header = (
        f"{'block':>5} {'phase':<11} {'steps':>5} {'C++ med':>9} {'C++ p99':>9} "
        f"{'twin med':>9} {'twin p99':>9} {'speedup':>8}"
    )
    print(header + "\n" + "-" * len(header))
    for block_size in args.block_sizes:
        cpp_runs, twin_runs = [], []
        for _ in range(args.repeats):  # interleaved, so background load hits both alike
            cpp_runs.append(run(CppScheduler, workload, block_size, args.max_num_batched_tokens))
            twin_runs.append(run(PyScheduler, workload, block_size, args.max_num_batched_tokens))
            assert cpp_runs[-1]["outputs"] == twin_runs[-1]["outputs"], "C++ and twin disagree"
        cpp = {"steps": [x for r in cpp_runs for x in r["steps"]]}
        twin = {"steps": [x for r in twin_runs for x in r["steps"]]}
        s_cpp, s_twin = summarize(cpp["steps"]), summarize(twin["steps"])
        entry: dict[str, Any] = {"num_steps_per_run": len(cpp_runs[0]["steps"]), "phases": {}}
        for label in ["decode@256", "decode@64", "decode@16", "prefill"]:
            if label not in s_cpp:
                continue
            c, t = s_cpp[label], s_twin[label]
            speedup = t["median_us"] / c["median_us"]
            entry["phases"][label] = {"cpp": c, "twin": t, "speedup_median": speedup}
            print(
                f"{block_size:>5} {label:<11} {c['num_steps']:>5} {c['median_us']:>9.1f} "
                f"{c['p99_us']:>9.1f} {t['median_us']:>9.1f} {t['p99_us']:>9.1f} "
                f"{speedup:>7.1f}x"
            )
        entry["total_s_per_run"] = {
            "cpp": sum(x for *_, x in cpp["steps"]) / 1e6 / args.repeats,
            "twin": sum(x for *_, x in twin["steps"]) / 1e6 / args.repeats,
        }
        results["block_sizes"][str(block_size)] = entry
    print("(microseconds per step of schedule() + update(); speedup = twin median / C++ median)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
