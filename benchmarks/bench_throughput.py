"""How close does the engine come to the card's roofline on nano-vllm's offline workload?

Workload (workload.py): nano-vllm's bench, 256 requests of 100-1024 random prompt tokens and
100-1024 output tokens each (temperature 0.6, ignore_eos). Model: Qwen3-0.6B's shape, or with
--model-shape 8b / 14b those of Qwen3-8B / 14B (dummy weights drawn on the GPU, bf16;
max_model_len 4096). A warm-up generate runs first.

In the same run:
  * the card's ceilings (roofline.py): copy and read-only bandwidth, each the best of several
    runs, and the bf16 matmul rate; the roofline takes the higher bandwidth (both are reported);
  * minivllm with the C++ scheduler (the default), with where its time went by kind of step
    against each step's roofline, and with scheduler="python" (--no-python skips it);
  * transformers' continuous batching (`generate_batch`) on the first --peer-requests requests
    (--no-peer skips it);
  * the GPU busy fraction and the host's schedule + update time per decode step at 256 and at 8
    running sequences (the engine's loop driven by hand).
Prints a table last; writes JSON to --out. --smoke runs it all on the CPU with a tiny random
model and a handful of requests (a check of the script, not a measurement).

With --tp N [N ...] the engine runs once per tensor_parallel_size N instead (the C++ scheduler,
async scheduling unless --no-async; no Python scheduler or transformers run): each with its
decode probe at 8 and 256 running, where the probe also sums the profiled NCCL kernels per step
(the all-reduce time), and one request's time per output token (512-token prompt).

    python benchmarks/bench_throughput.py [--model-shape 0.6b|8b|14b] [--no-peer] [--no-python]
    python benchmarks/bench_throughput.py --model-shape 8b --tp 1 2 4
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import pkgutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_common import allocator_counters, device_info
from minivllm import LLM, SamplingParams
from roofline import Ceilings, ModelCost, workload_seconds
from steps import StepLoop, StepRecord, StepRecorder
from workload import (
    MODEL_SHAPES,
    NUM_SEQS,
    engine_args,
    make_model_dir,
    nano_vllm_workload,
    smoke_workload,
)

DECODE_KINDS = ((16, "decode 1-16"), (64, "decode 17-64"), (160, "decode 65-160"))


def step_kind(num_tokens: int, num_decodes: int) -> str:
    if num_tokens != num_decodes:
        return "prefill / mixed"
    return next((kind for most, kind in DECODE_KINDS if num_decodes <= most), "decode 161-256")


def compiled_triton_kernels() -> dict[str, int]:
    """How many specializations of each of our Triton kernels are compiled so far (a compile
    inside the timed run costs it a fraction of a second)."""
    import minivllm.kernels as pkg

    counts = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"minivllm.kernels.{info.name}")
        for name, obj in vars(mod).items():
            caches = getattr(obj, "device_caches", None)
            if not isinstance(caches, dict):
                continue
            try:
                counts[f"{info.name}.{name}"] = sum(len(c[0]) for c in caches.values())
            except (TypeError, IndexError):
                pass
    return counts


def step_breakdown(
    records: list[StepRecord], start: float, end: float, cost: ModelCost, ceilings: Ceilings
) -> dict[str, Any]:
    """Where the timed run went, by kind of step against each step's roofline. A step's time
    runs from when the GPU could start it (its launch, or the previous step's ids read back, if
    later) to its own ids read back; steps without sampled rows are folded into the next one's.
    With async scheduling the launches run ahead, so this is GPU-side time plus any wait for the
    host; what is left of the wall time went to steps that never waited for the GPU."""
    groups: dict[str, list[float]] = {}
    prev_end, covered, pending_roof = start, 0.0, 0.0
    timed = []
    for index, r in enumerate(records):
        roof = cost.step_seconds(
            r.num_tokens, r.num_decodes, r.num_samples, r.context_tokens, r.pairs, ceilings
        )
        g = groups.setdefault(step_kind(r.num_tokens, r.num_decodes), [0, 0.0, 0.0])
        g[0] += 1
        g[2] += roof
        if r.read is None:  # no sampled rows: its time shows up in the next step's
            pending_roof += roof
            continue
        seconds = r.read - max(prev_end, r.launched)
        g[1] += seconds
        covered += seconds
        timed.append(
            {
                "ms": seconds * 1e3,
                "step": index,
                "offset_s": r.launched - start,
                "tokens": r.num_tokens,
                "decodes": r.num_decodes,
                "roofline_ms": (roof + pending_roof) * 1e3,
                # the host's part: its launch call, and how long after the previous step's ids
                # came back it started (negative: launched ahead, as async scheduling does)
                "host_ms": r.host_s * 1e3,
                "launched_after_prev_ms": (r.launched - prev_end) * 1e3,
            }
        )
        prev_end, pending_roof = r.read, 0.0
    return {
        "slowest_steps": sorted(timed, key=lambda st: -st["ms"])[:6],
        "num_steps": len(records),
        "seconds_in_steps": covered,
        "seconds_outside": (end - start) - covered,
        "by_kind": {
            k: {"steps": g[0], "seconds": g[1], "roofline_s": g[2]}
            for k, g in sorted(groups.items())
        },
    }


def sync(llm: LLM) -> None:
    if llm.config.torch_device.type == "cuda":
        torch.cuda.synchronize()


def run_minivllm(
    model_dir: str,
    prompts: list[list[int]],
    max_tokens: list[int],
    args: dict[str, Any],
    probe: tuple[int, ...],
    breakdown: tuple[ModelCost, Ceilings] | None = None,
    one_request: bool = False,
) -> dict[str, Any]:
    llm = LLM(model_dir, max_model_len=4096, **args)
    # Reversed prompts: the timed run must not find the warm-up's blocks in the prefix cache.
    warm = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=16)
    llm.generate([p[:128][::-1] for p in prompts[:8]], warm, use_tqdm=False)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in max_tokens]
    compiled_before = compiled_triton_kernels()
    with StepRecorder(llm) as recorder:
        sync(llm)
        allocator_before = allocator_counters()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        sync(llm)
        elapsed = time.perf_counter() - t0
        allocator_after = allocator_counters()
    compiled_after = compiled_triton_kernels()
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    ms_per_token = one_request_ms_per_token(llm, prompts[0]) if one_request else None
    num_in = sum(len(p) for p in prompts)
    assert num_out == sum(max_tokens), (num_out, sum(max_tokens))
    assert llm.num_free_blocks == llm.runtime.num_kv_blocks
    result = {
        "seconds": elapsed,
        "output_tokens": num_out,
        "output_tok_s": num_out / elapsed,
        "total_tok_s": (num_out + num_in) / elapsed,
        "num_kv_blocks": llm.runtime.num_kv_blocks,
        "tensor_parallel_size": llm.config.tensor_parallel_size,
        "async_scheduling": llm.config.async_scheduling,
        "one_request_ms_per_token": ms_per_token,
        "stats": llm.stats,
        "triton_compiles_during_run": {
            k: n - compiled_before.get(k, 0)
            for k, n in compiled_after.items()
            if n > compiled_before.get(k, 0)
        },
        # cudaMalloc calls and retries of the allocator during the timed run, and what it held
        # before -> after (profile_workload.py says which steps made them)
        "allocator_during_run": {
            "cuda_mallocs": allocator_after.get("cuda_mallocs", 0)
            - allocator_before.get("cuda_mallocs", 0),
            "alloc_retries": allocator_after.get("alloc_retries", 0)
            - allocator_before.get("alloc_retries", 0),
            "reserved_gib": [
                allocator_before.get("reserved_bytes", 0) / 2**30,
                allocator_after.get("reserved_bytes", 0) / 2**30,
            ],
        },
    }
    if breakdown is not None:
        result["steps"] = step_breakdown(recorder.records, t0, t0 + elapsed, *breakdown)
    result["decode_probe"] = {str(n): probe_decode_steps(llm, prompts, n) for n in probe}
    llm.close()
    del llm, recorder
    gc.collect()  # the engine holds reference cycles: free its memory before the next one
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def one_request_ms_per_token(llm: LLM, prompt: list[int], new_tokens: int = 128) -> float:
    """One request alone: (wall of generate at 1 + new_tokens tokens - wall at 1) / new_tokens,
    the median of three, each on a prompt of its own (no prefix-cache hit)."""
    prompt, vocab = (prompt * 2)[:512], min(llm.config.model_config.vocab_size, 10000)
    times = []
    for k in range(1, 4):
        walls = []
        for n in (1, 1 + new_tokens):
            ids = [(t + 1000 * k + n) % vocab for t in prompt]
            params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n)
            sync(llm)
            t0 = time.perf_counter()
            llm.generate([ids], params, use_tqdm=False)
            sync(llm)
            walls.append(time.perf_counter() - t0)
        times.append((walls[1] - walls[0]) / new_tokens)
    return float(np.median(times)) * 1e3


def probe_decode_steps(
    llm: LLM, prompts: list[list[int]], num_running: int, num_steps: int = 24
) -> dict[str, float | None]:
    """The engine's loop with `num_running` sequences of 256-token prompts decoding: per step the
    wall time, the GPU kernel time (profiler, union of kernel intervals; CUDA only), the GPU busy
    fraction, the NCCL kernels' time (the all-reduces of tensor parallelism, rank 0's GPU), and
    the host time in schedule + update."""
    from torch.profiler import ProfilerActivity, profile

    loop, cuda = StepLoop(llm), llm.config.torch_device.type == "cuda"
    base = 10**9 + num_running * 1000
    for i in range(num_running):
        loop.scheduler.add_request(
            base + i, prompts[i % len(prompts)][:256], 10**3, ignore_eos=True, temperature=0.6,
            seed=i,
        )  # fmt: skip
    loop.step_until_decoding()
    for _ in range(5):  # settle
        loop.step()
    host = []
    profiler = profile(activities=[ProfilerActivity.CUDA]) if cuda else contextlib.nullcontext()
    with profiler as prof:
        sync(llm)
        w0 = time.perf_counter()
        for _ in range(num_steps):
            host.append(loop.step()[1])
        sync(llm)
        window = time.perf_counter() - w0
    loop.drain()
    for i in range(num_running):
        loop.scheduler.abort(base + i)
    wall_step = window / num_steps
    gpu_step = busy_seconds(prof) / num_steps if cuda else None
    nccl_step = nccl_seconds(prof) / num_steps if cuda else None
    return {
        "running": num_running,
        "wall_us_per_step": wall_step * 1e6,
        "gpu_us_per_step": None if gpu_step is None else gpu_step * 1e6,
        "gpu_busy": None if gpu_step is None else gpu_step / wall_step,
        "idle_us_per_step": None if gpu_step is None else (wall_step - gpu_step) * 1e6,
        "nccl_us_per_step": None if nccl_step is None else nccl_step * 1e6,
        "schedule_update_us_median": float(np.median(host)) * 1e6,
    }


def nccl_seconds(prof: Any) -> float:
    """The summed time of the profiled NCCL kernels (all-reduces, all-gathers)."""
    return 1e-6 * sum(
        e.time_range.end - e.time_range.start
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and "nccl" in e.name.lower()
    )


def busy_seconds(prof: Any) -> float:
    """The union of the profiled GPU kernels' intervals."""
    intervals = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy_us, cur_s, cur_e = 0.0, None, None
    for s, e in intervals:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy_us += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy_us += cur_e - cur_s
    return busy_us * 1e-6


def run_peer(model_dir: str, prompts: list[list[int]], max_tokens: list[int]) -> dict[str, Any]:
    """transformers' continuous batching on the same architecture and prompts."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = (
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        .to("cuda")
        .eval()
    )
    # generate_batch takes one max_new_tokens for all requests: the mean of theirs.
    new_tokens = round(float(np.mean(max_tokens)))
    sampling = {"do_sample": True, "temperature": 0.6, "eos_token_id": None, "pad_token_id": 0}
    gen = GenerationConfig(max_new_tokens=new_tokens, top_k=0, top_p=1.0, **sampling)
    warm = GenerationConfig(max_new_tokens=16, **sampling)
    model.generate_batch(inputs=[p[:128] for p in prompts[:8]], generation_config=warm)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=gen)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    num_out = sum(len(r.generated_tokens) for r in results.values())
    num_in = sum(len(p) for p in prompts)
    del model
    torch.cuda.empty_cache()
    return {
        "seconds": elapsed,
        "requests": len(prompts),
        "max_new_tokens": new_tokens,
        "output_tokens": num_out,
        "output_tok_s": num_out / elapsed,
        "total_tok_s": (num_out + num_in) / elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out/throughput.json")
    ap.add_argument("--model-shape", default="0.6b", choices=list(MODEL_SHAPES))
    ap.add_argument("--no-peer", action="store_true", help="skip transformers' generate_batch")
    ap.add_argument(
        "--peer-requests", type=int, default=64, help="run the peer on the first N requests"
    )
    ap.add_argument("--no-python", action="store_true", help="skip the scheduler='python' run")
    ap.add_argument("--num-seqs", type=int, default=NUM_SEQS)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (engine default)")
    ap.add_argument(
        "--no-async",
        action="store_true",
        help="async_scheduling=False: the host's work is not hidden behind the GPU",
    )
    ap.add_argument(
        "--tp",
        type=int,
        nargs="+",
        metavar="N",
        help="one run per tensor_parallel_size N instead of the single-GPU runs",
    )
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, in seconds")
    args = ap.parse_args()
    if args.tp and not args.smoke and max(args.tp) > torch.cuda.device_count():
        raise SystemExit(
            f"--tp {max(args.tp)} needs {max(args.tp)} GPUs; {torch.cuda.device_count()} visible"
        )
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_throughput needs a CUDA GPU (or --smoke)")

    info = device_info()
    ceilings = Ceilings.measure()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_model_dir(tmp, args.model_shape, smoke=args.smoke))
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        if args.smoke:
            prompts, max_tokens = smoke_workload(cfg["vocab_size"])
        else:
            prompts, max_tokens = nano_vllm_workload(args.num_seqs)
        cost = ModelCost.from_config(cfg)
        roof = workload_seconds(cost, prompts, max_tokens, ceilings)
        copy_roof = workload_seconds(
            cost, prompts, max_tokens, Ceilings(ceilings.copy_gbs, 0.0, ceilings.matmul_tflops)
        )
        llm_args: dict[str, Any] = {**engine_args(args.smoke), "enforce_eager": args.enforce_eager}
        if args.block_size is not None:
            llm_args["block_size"] = args.block_size
        if args.no_async:
            llm_args["async_scheduling"] = False
        probe = (4, 2) if args.smoke else (256, 8)
        results: dict[str, Any] = {
            **info,
            "model_shape": "tiny (smoke)" if args.smoke else args.model_shape,
            "workload": {
                "requests": len(prompts),
                "prompt_tokens": sum(map(len, prompts)),
                "output_tokens": sum(max_tokens),
            },
            "ceilings": ceilings.as_dict(),
            "roofline": roof,
            "roofline_at_copy_rate": copy_roof,
            "engine_args": llm_args,
        }
        if args.tp:
            results["tp"] = {
                str(n): run_minivllm(
                    model_dir,
                    prompts,
                    max_tokens,
                    {**llm_args, "tensor_parallel_size": n, "async_scheduling": not args.no_async},
                    probe,
                    one_request=True,
                )
                for n in args.tp
            }
            args.no_python = args.no_peer = True
        else:
            results["cpp"] = run_minivllm(
                model_dir, prompts, max_tokens, llm_args, probe, breakdown=(cost, ceilings)
            )
        if not args.no_python:
            results["python"] = run_minivllm(
                model_dir, prompts, max_tokens, {**llm_args, "scheduler": "python"}, probe
            )
        if not args.no_peer and not args.smoke:
            n = min(args.peer_requests, len(prompts))
            try:
                results["peer"] = run_peer(model_dir, prompts[:n], max_tokens[:n])
            except Exception as e:  # noqa: BLE001 -- its API moves between transformers releases
                results["peer"] = {"error": f"{type(e).__name__}: {e}"}

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print_summary(results)


def print_tp_summary(results: dict[str, Any]) -> None:
    """One row per tensor_parallel_size: throughput against N = 1 (or the first N run), one
    request's time per token, and the decode probe's step time and all-reduce time."""
    runs = results["tp"]
    base = runs.get("1") or next(iter(runs.values()))
    print(f"\n{results['device']}, {results['model_shape']}, tensor parallelism")
    keys = list(base["decode_probe"])  # running counts probed: 256 and 8 (smoke: 4 and 2)
    probe_head = "".join(f"{'@' + k + ' us':>9}{'NCCL':>7}" for k in keys)
    print(
        f"{'N':>3}{'seconds':>9}{'out tok/s':>11}{'x base':>8}{'ms/token, 1 req':>17}{probe_head}"
    )
    for n, r in runs.items():
        cells = ""
        for k in keys:
            d = r["decode_probe"][k]
            nccl = "-" if d["nccl_us_per_step"] is None else f"{d['nccl_us_per_step']:.0f}"
            cells += f"{d['wall_us_per_step']:>9.0f}{nccl:>7}"
        print(
            f"{n:>3}{r['seconds']:>9.2f}{r['output_tok_s']:>11,.0f}"
            f"{r['output_tok_s'] / base['output_tok_s']:>8.2f}"
            f"{r['one_request_ms_per_token']:>17.3f}{cells}"
        )


def print_summary(results: dict[str, Any]) -> None:
    if "tp" in results:
        print_tp_summary(results)
        return
    c, roof = results["ceilings"], results["roofline"]
    roof_tok_s = results["workload"]["output_tokens"] / roof["total_s"]
    copy_tok_s = results["workload"]["output_tokens"] / results["roofline_at_copy_rate"]["total_s"]
    print(
        f"\n{results['device']}, {results['model_shape']}: copy {c['copy_gbs']:,.0f} GB/s, "
        f"read-only {c['read_gbs']:,.0f} GB/s, bf16 matmul {c['matmul_tflops']:,.0f} TFLOP/s; "
        f"roofline {roof['total_s']:.2f} s (decode {roof['decode_s']:.2f} s, prefill "
        f"{roof['prefill_s']:.2f} s) = {roof_tok_s:,.0f} output tok/s "
        f"({copy_tok_s:,.0f} at the copy rate)"
    )
    print(f"{'run':<28}{'seconds':>9}{'out tok/s':>12}{'total tok/s':>13}{'of roofline':>13}"
          f"{'at copy rate':>14}")  # fmt: skip
    for key, label in (
        ("cpp", "minivllm (cpp scheduler)"),
        ("python", "minivllm (python sched.)"),
        ("peer", "transformers generate_batch"),
    ):
        r = results.get(key)
        if r is None:
            continue
        if "error" in r:
            print(f"{label:<28} failed: {r['error'][:120]}")
            continue
        note = (
            f"  ({r['requests']} requests, {r['max_new_tokens']} new each)" if key == "peer" else ""
        )
        print(
            f"{label:<28}{r['seconds']:>9.2f}{r['output_tok_s']:>12,.0f}{r['total_tok_s']:>13,.0f}"
            f"{r['output_tok_s'] / roof_tok_s:>13.1%}{r['output_tok_s'] / copy_tok_s:>14.1%}{note}"
        )
    steps = results["cpp"].get("steps")
    if steps:
        print(
            f"\ncpp run: {steps['num_steps']} steps, {steps['seconds_in_steps']:.2f} s from GPU "
            f"start to ids read back, {steps['seconds_outside']:.2f} s outside"
        )
        print(f"{'step kind':<20}{'steps':>7}{'seconds':>9}{'roofline s':>12}{'of roofline':>13}")
        for kind, g in steps["by_kind"].items():
            frac = g["roofline_s"] / g["seconds"] if g["seconds"] > 0 else float("nan")
            print(
                f"{kind:<20}{g['steps']:>7}{g['seconds']:>9.2f}{g['roofline_s']:>12.2f}"
                f"{frac:>13.1%}"
            )
        print("slowest steps:", ", ".join(
            f"{st['ms']:.1f} ms, step {st['step']} at {st['offset_s']:.2f} s ({st['tokens']} "
            f"tokens, {st['decodes']} decodes, roofline {st['roofline_ms']:.1f} ms; host "
            f"{st['host_ms']:.1f} ms in launch, launched {st['launched_after_prev_ms']:+.1f} ms "
            "after the previous ids)" for st in steps["slowest_steps"]
        ))  # fmt: skip
        compiles = results["cpp"]["triton_compiles_during_run"]
        print("Triton compiles during the timed run:", compiles or "none")
        alloc = results["cpp"]["allocator_during_run"]
        print(
            f"CUDA allocator during the timed run: {alloc['cuda_mallocs']} cudaMalloc, "
            f"{alloc['alloc_retries']} retries, held {alloc['reserved_gib'][0]:.2f} -> "
            f"{alloc['reserved_gib'][1]:.2f} GiB"
        )
    print(f"\n{'decode probe':<28}{'wall us':>9}{'gpu us':>9}{'busy':>7}{'idle us':>9}"
          f"{'sched+upd us':>14}")  # fmt: skip
    for key in ("cpp", "python"):
        for n, d in results.get(key, {}).get("decode_probe", {}).items():
            gpu = "-" if d["gpu_busy"] is None else f"{d['gpu_us_per_step']:.0f}"
            busy = "-" if d["gpu_busy"] is None else f"{d['gpu_busy']:.1%}"
            idle = "-" if d["gpu_busy"] is None else f"{d['idle_us_per_step']:.0f}"
            print(
                f"{key + ' @ ' + n + ' running':<28}{d['wall_us_per_step']:>9.0f}{gpu:>9}"
                f"{busy:>7}{idle:>9}{d['schedule_update_us_median']:>14.1f}"
            )


if __name__ == "__main__":
    main()
