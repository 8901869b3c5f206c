"""What does the host spend per engine step, and where?

  * scheduler: schedule() + update() per step of the C++ core against its Python twin, with no
    model: nano-vllm's workload (workload.py) driven to completion with synthetic sampled tokens,
    both cores in the same process (runs interleaved, outputs checked equal), per block size.
    Decode steps are bucketed by their number of running sequences (256; 56-72 as "64"; 12-20
    as "16"); "prefill" is every step that carries prompt tokens.
  * step: one engine step phase by phase, the device synchronised after each so that each shows
    its own cost: schedule (into the staging buffer), launch (upload, graph replay or eager
    kernel launches), launch to idle (the launch plus the GPU's work), read back, update; for
    decode steps at --running sequences of --context tokens, and for 8192-token prefill steps;
    then the host time to launch the decode graph of each --running batch size.
Runs on the CPU too (the scheduler part needs no GPU; --smoke makes the rest a tiny model on the
CPU, in seconds). Prints the tables; writes JSON to --out.

    python benchmarks/bench_host.py [--parts scheduler step] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from bench_common import device_info, print_table, write_json
from minivllm import LLM
from minivllm._core import Scheduler as CppScheduler
from minivllm.engine.reference import Scheduler as TwinScheduler
from steps import StepLoop
from workload import engine_args, make_model_dir, nano_vllm_workload

# Decode buckets: label -> accepted numbers of running sequences.
DECODE_BUCKETS = {"decode@256": (256, 256), "decode@64": (56, 72), "decode@16": (12, 20)}
PHASES = ("schedule", "launch", "launch_to_idle", "read_back", "update")


# ---- scheduler: the core alone -----------------------------------------------------------------


def run_scheduler(
    scheduler_cls: Any,
    prompts: list[list[int]],
    max_tokens: list[int],
    block_size: int,
    max_num_batched_tokens: int,
) -> dict[str, Any]:
    """The workload to completion; per step (kind, running, microseconds of schedule + update)."""
    num_blocks = sum(-(-(len(p) + m) // block_size) for p, m in zip(prompts, max_tokens))
    sched = scheduler_cls(num_blocks, block_size, 256, max_num_batched_tokens, 4096)
    for seq_id, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        sched.add_request(seq_id, prompt, n, ignore_eos=True, temperature=0.6)
    token_pool = np.random.default_rng(0).integers(0, 10000, size=1 << 16, dtype=np.int64)
    steps: list[tuple[str, int, float]] = []
    outputs: dict[int, list[int]] = {}
    offset = 0
    while sched.has_unfinished():
        t0 = time.perf_counter_ns()
        batch = sched.schedule()
        t1 = time.perf_counter_ns()
        num_sampled = len(batch.sample_seq_ids)
        if offset + num_sampled > len(token_pool):
            offset = 0
        tokens = token_pool[offset : offset + num_sampled]  # not timed
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
    return {"steps": steps, "outputs": outputs}


def summarize(steps: list[tuple[str, int, float]]) -> dict[str, dict[str, float]]:
    groups = {"prefill": [t for k, _, t in steps if k == "prefill"]}
    for label, (lo, hi) in DECODE_BUCKETS.items():
        groups[label] = [t for k, n, t in steps if k == "decode" and lo <= n <= hi]
    return {
        label: {
            "steps": len(times),
            "median_us": statistics.median(times),
            "p99_us": float(np.percentile(times, 99)),
        }
        for label, times in groups.items()
        if times
    }


def bench_scheduler(args: argparse.Namespace) -> list[dict[str, Any]]:
    prompts, max_tokens = nano_vllm_workload(args.num_seqs)
    rows = []
    for block_size in args.block_sizes:
        cpp, twin = [], []
        for _ in range(args.repeats):  # interleaved, so background load hits both alike
            c = run_scheduler(CppScheduler, prompts, max_tokens, block_size, 8192)
            t = run_scheduler(TwinScheduler, prompts, max_tokens, block_size, 8192)
            assert c["outputs"] == t["outputs"], "the C++ core and its twin disagree"
            cpp += c["steps"]
            twin += t["steps"]
        s_cpp, s_twin = summarize(cpp), summarize(twin)
        for label in (*DECODE_BUCKETS, "prefill"):
            if label in s_cpp:
                c, t = s_cpp[label], s_twin[label]
                rows.append({
                    "block": block_size,
                    "phase": label,
                    "steps": c["steps"],
                    "cpp_median_us": c["median_us"],
                    "cpp_p99_us": c["p99_us"],
                    "twin_median_us": t["median_us"],
                    "twin_p99_us": t["p99_us"],
                    "speedup": t["median_us"] / c["median_us"],
                })  # fmt: skip
    return rows


# ---- step and graphs: the engine -----------------------------------------------------------------


def bench_engine(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, float]]:
    cuda = not args.smoke and torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    running = sorted(args.running, reverse=True)
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(
            str(make_model_dir(tmp, smoke=args.smoke)),
            max_model_len=4096,
            max_num_seqs=max(running),
            scheduler=args.scheduler,
            enforce_eager=args.enforce_eager,
            **engine_args(args.smoke),
        )
    loop, rng = StepLoop(llm), np.random.default_rng(0)
    vocab = min(llm.runtime.vocab_size, 10000)
    rows, graph_launch = [], {}
    seq_id = 0
    for n in running:
        ids = list(range(seq_id, seq_id + n))
        seq_id += n
        for i in ids:
            prompt = rng.integers(0, vocab, args.context).tolist()
            loop.scheduler.add_request(i, prompt, 10**3, ignore_eos=True, temperature=0.6, seed=i)
        loop.step_until_decoding()
        rows.append(phase_row(f"decode @ {n}", loop, sync, args.steps))
        graph_launch.update(loop.graph_launch_seconds(sync, n))  # right after a step of n rows
        loop.drain()
        for i in ids:
            loop.scheduler.abort(i)
    # Steps with prefill: prompts enough for several full steps.
    prefill_len = 32 if args.smoke else 1000
    num_prompts = 8 if args.smoke else 64
    for i in range(seq_id, seq_id + num_prompts):
        prompt = rng.integers(0, vocab, prefill_len).tolist()
        loop.scheduler.add_request(i, prompt, 8, ignore_eos=True, temperature=0.6, seed=i)
    rows.append(phase_row("prefill", loop, sync, 3, prefill_only=True))
    llm.close()
    return rows, {str(k): v * 1e6 for k, v in graph_launch.items()}


def phase_row(
    label: str, loop: StepLoop, sync: Any, steps: int, prefill_only: bool = False
) -> dict[str, Any]:
    """Median microseconds per phase over `steps` steps (only those with prefill if asked)."""
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    num_tokens = []
    while len(num_tokens) < steps:
        batch, phases = loop.step_phases(sync)
        if prefill_only and batch.num_tokens == batch.num_decodes:
            break
        num_tokens.append(int(batch.num_tokens))
        for p in PHASES:
            times[p].append(phases[p] * 1e6)
    return {
        "step": label,
        "tokens": int(np.median(num_tokens)),
        **{f"{p}_us": float(np.median(v)) for p, v in times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--parts", nargs="+", default=["scheduler", "step"], choices=["scheduler", "step"]
    )
    ap.add_argument("--out", default="benchmarks/out/host.json")
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[256, 16])
    ap.add_argument("--repeats", type=int, default=3, help="runs of the workload per core")
    ap.add_argument("--num-seqs", type=int, default=256, help="requests of the scheduler part")
    ap.add_argument("--running", type=int, nargs="+", default=[256, 8])
    ap.add_argument("--context", type=int, default=512, help="prompt tokens of the decode steps")
    ap.add_argument("--steps", type=int, default=20, help="steps timed per row")
    ap.add_argument("--scheduler", default="cpp", choices=["cpp", "python"])
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="small sizes, a tiny model on the CPU")
    args = ap.parse_args()
    if args.smoke:
        args.block_sizes, args.repeats, args.num_seqs = [16], 1, 24
        args.running, args.context, args.steps = [4, 2], 24, 3
    elif "step" in args.parts and not torch.cuda.is_available():
        raise SystemExit("the step part needs a CUDA GPU (or --smoke); --parts scheduler runs here")

    results: dict[str, Any] = {**device_info(), "args": vars(args)}
    if "scheduler" in args.parts:
        results["scheduler"] = bench_scheduler(args)
        print("\nschedule() + update() per step, microseconds (speedup: twin / C++ median)")
        print_table(results["scheduler"], list(results["scheduler"][0]))
    if "step" in args.parts:
        results["step"], results["graph_launch_us"] = bench_engine(args)
        print(f"\none step phase by phase ({args.scheduler} scheduler), median microseconds")
        print_table(results["step"], list(results["step"][0]))
        if results["graph_launch_us"]:
            print("decode graph launch, host us by batch size:", {
                k: round(v, 1) for k, v in results["graph_launch_us"].items()
            })  # fmt: skip
    write_json(args.out, results)


if __name__ == "__main__":
    main()
