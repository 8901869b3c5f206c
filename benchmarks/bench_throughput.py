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
from decode_probe import one_request_ms_per_token, probe_decode_steps, sync
from minivllm import LLM, SamplingParams
from roofline import Ceilings, ModelCost, workload_seconds
from step_breakdown import step_breakdown
from steps import StepRecorder
from throughput_report import print_summary
from workload import (
    MODEL_SHAPES,
    NUM_SEQS,
    engine_args,
    make_model_dir,
    nano_vllm_workload,
    smoke_workload,
)


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
        flop_roof = workload_seconds(cost, prompts, max_tokens, ceilings, flop_aware=True)
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
            "roofline_flop_aware": flop_roof,
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


if __name__ == "__main__":
    main()
