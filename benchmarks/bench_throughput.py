"""End-to-end offline throughput on the nano-vllm bench workload, against the card's roofline.

Workload (nano-vllm's bench.py): seed 0; 256 requests; prompt ids uniform 0..10000 with lengths
uniform 100..1024; per request temperature 0.6, ignore_eos, max_tokens uniform 100..1024
(133,966 output tokens). Model: Qwen3-0.6B's architecture, random weights (load_format="dummy"),
bf16, max_model_len 4096. A warm-up generate runs first.

In the same run:
  * minivllm with the C++ scheduler (the default) and with scheduler="python" (host overhead);
  * the peer: transformers' own continuous batching (`generate_batch`) on the same architecture
    and prompts (--no-peer skips it; --peer-requests N runs it on the first N requests);
  * the roofline: each decode step reads the weights once plus every running sequence's KV, over
    the copy bandwidth measured here, plus prefill FLOPs over the bf16 matmul rate measured here;
  * GPU busy fraction and host time per decode step at 256 and at 8 running sequences.

Prints a table last; writes JSON to --out.

    python benchmarks/bench_throughput.py --out bench_out/throughput.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from minivllm import LLM, SamplingParams
from minivllm.demo import make_demo_checkpoint

NUM_SEQS, MAX_INPUT_LEN, MAX_OUTPUT_LEN = 256, 1024, 1024


def nano_vllm_workload(num_seqs: int = NUM_SEQS) -> tuple[list[list[int]], list[int]]:
    """Exactly nano-vllm's bench.py draws: all prompts first, then all max_tokens."""
    random.seed(0)
    prompts = [
        [random.randint(0, 10000) for _ in range(random.randint(100, MAX_INPUT_LEN))]
        for _ in range(num_seqs)
    ]
    max_tokens = [random.randint(100, MAX_OUTPUT_LEN) for _ in range(num_seqs)]
    return prompts, max_tokens


# ---- ceilings measured on this card ----------------------------------------------------------


def measure_copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB; bytes read + written per second."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * n / float(np.median(times))


def measure_matmul_rate() -> float:
    """bf16 8192^3 matmul on random data; FLOP/s."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / float(np.median(times))


def roofline_seconds(
    cfg: dict[str, Any], prompts: list[list[int]], max_tokens: list[int], bw: float, flops: float
) -> dict[str, float]:
    """The fastest any engine could run the workload on this card.

    Decode step t (t >= 1; token 0 comes from the prefill) reads every weight once and the KV of
    every request still running (context prompt + t); prefill costs its matmul + attention FLOPs.
    """
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads, hd, vocab = (
        cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]
    )
    per_layer = hidden * (heads + 2 * kv_heads) * hd + heads * hd * hidden + 3 * hidden * inter
    weight_bytes = 2 * (layers * per_layer + vocab * hidden)  # LM head (tied) read every step
    kv_bytes_per_token = 2 * layers * 2 * kv_heads * hd
    p = np.array([len(x) for x in prompts], dtype=np.float64)
    m = np.array(max_tokens, dtype=np.float64)
    decode_bytes = 0.0
    for t in range(1, int(m.max())):
        running = m > t
        decode_bytes += weight_bytes + kv_bytes_per_token * float((p[running] + t).sum())
    matmul_flops = 2 * layers * per_layer * p.sum() + 2 * vocab * hidden * len(prompts)
    attn_flops = 4 * layers * heads * hd * float((p * (p + 1) / 2).sum())
    decode_s = decode_bytes / bw
    prefill_s = (matmul_flops + attn_flops) / flops
    return {"decode_s": decode_s, "prefill_s": prefill_s, "total_s": decode_s + prefill_s,
            "weight_bytes": weight_bytes, "decode_bytes": decode_bytes}


@dataclass(frozen=True)
class StepCost:
    """Roofline cost of one step: a decode-only step reads the weights and every row's KV at the
    copy bandwidth; a step with prefill costs its matmul and causal attention FLOPs at the matmul
    rate (at least the weight read)."""

    weight_bytes: float
    kv_bytes_per_token: float
    flops_per_token: float  # matmuls
    attn_flops_per_pair: float  # per (query, key) pair
    bw: float
    rate: float

    def seconds(self, num_tokens: int, num_decodes: int, context: int, pairs: int) -> float:
        if num_tokens == num_decodes:  # decode-only: memory bound
            return (self.weight_bytes + self.kv_bytes_per_token * context) / self.bw
        flops = self.flops_per_token * num_tokens + self.attn_flops_per_pair * pairs
        return max(flops / self.rate, self.weight_bytes / self.bw)


def compiled_triton_kernels() -> dict[str, int]:
    """How many specializations of each of our Triton kernels are compiled so far (a compile
    inside the timed run costs it a fraction of a second)."""
    import importlib
    import pkgutil

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


def step_breakdown(steps: list[list], start: float, end: float, cost: StepCost) -> dict:
    """Where the timed run went, by kind of step against each step's roofline. A step's time is
    from when the GPU could start it (its launch, or the previous step's ids read back, if
    later) to its own ids read back; steps without sampled rows are folded into the next one's.
    With async scheduling the launches run ahead, so this is GPU-side time plus any wait for the
    host; what is left of the wall time went to steps that never waited for the GPU."""
    groups: dict[str, list[float]] = {}
    prev_end, covered, pending_roof = start, 0.0, 0.0
    timed = []
    for launched, read, num_tokens, nd, context, pairs in steps:
        roof = cost.seconds(num_tokens, nd, context, pairs)
        if num_tokens == nd:
            key = ("decode 1-16" if nd <= 16 else "decode 17-64" if nd <= 64
                   else "decode 65-160" if nd <= 160 else "decode 161-256")
        else:
            key = "prefill / mixed"
        g = groups.setdefault(key, [0, 0.0, 0.0])
        g[0] += 1
        g[2] += roof
        if read is None:  # no sampled rows: its time shows up in the next step's
            pending_roof += roof
            continue
        seconds = read - max(prev_end, launched)
        g[1] += seconds
        covered += seconds
        timed.append((seconds, launched - start, num_tokens, nd, roof + pending_roof))
        prev_end, pending_roof = read, 0.0
    slowest = sorted(timed, key=lambda st: -st[0])[:6]
    return {
        "slowest_steps": [
            {"ms": s * 1e3, "offset_s": off, "tokens": n, "decodes": nd, "roofline_ms": r * 1e3}
            for s, off, n, nd, r in slowest
        ],
        "num_steps": len(steps),
        "seconds_in_steps": covered,
        "seconds_outside": (end - start) - covered,
        "by_kind": {k: {"steps": g[0], "seconds": g[1], "roofline_s": g[2]}
                    for k, g in sorted(groups.items())},
    }


# ---- minivllm ---------------------------------------------------------------------------------


def run_minivllm(
    model_dir: str, prompts: list[list[int]], max_tokens: list[int], cost: StepCost | None = None,
    **engine_args: Any
) -> dict[str, Any]:
    llm = LLM(model_dir, dtype="bfloat16", load_format="dummy", max_model_len=4096, seed=0,
              **engine_args)
    warm = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=16)] * 8
    llm.generate([p[:128] for p in prompts[:8]], warm, use_tqdm=False)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in max_tokens]
    steps: list[list] = []  # [launched, result read, tokens, decodes, context, pairs]
    runner = llm.model_runner
    real_launch = runner.launch

    class TimedResult:
        def __init__(self, result: Any, record: list) -> None:
            self.inner, self.record = result, record

        def result(self) -> np.ndarray:
            out = self.inner.result()
            self.record[1] = time.perf_counter()
            return out

    def timed_launch(batch: Any, staged: bool = False) -> TimedResult:
        seq_lens = (runner.buffers.host_view("seq_lens")[: batch.num_seqs] if staged
                    else batch.seq_lens).astype(np.int64)
        new = np.diff(batch.query_start_loc).astype(np.int64)
        pairs = int((new * (seq_lens - (new - 1) / 2)).sum())  # causal (query, key) pairs
        record = [time.perf_counter(), None, batch.num_tokens, batch.num_decodes,
                  int(seq_lens.sum()), pairs]
        steps.append(record)
        return TimedResult(real_launch(batch, staged), record)

    runner.launch = timed_launch
    compiled_before = compiled_triton_kernels()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del runner.launch  # back to the method (an instance attribute would keep the engine alive)
    compiled_after = compiled_triton_kernels()
    new_compiles = {k: n - compiled_before.get(k, 0) for k, n in compiled_after.items()
                    if n > compiled_before.get(k, 0)}
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    num_in = sum(len(p) for p in prompts)
    assert num_out == sum(max_tokens), (num_out, sum(max_tokens))
    assert llm.num_free_blocks == llm.runtime.num_kv_blocks
    result = {
        "seconds": elapsed,
        "output_tokens": num_out,
        "output_tok_s": num_out / elapsed,
        "total_tok_s": (num_out + num_in) / elapsed,
        "num_kv_blocks": llm.runtime.num_kv_blocks,
        "stats": llm.stats,
    }
    result["triton_compiles_during_run"] = new_compiles
    if cost is not None:
        result["steps"] = step_breakdown(steps, t0, t0 + elapsed, cost)
    result["decode_profile"] = {
        str(n): profile_decode_steps(llm, prompts, n) for n in (256, 8)
    }
    del llm, runner, real_launch, timed_launch
    gc.collect()  # the engine holds reference cycles: free its GPU memory before the next one
    torch.cuda.empty_cache()
    return result


def profile_decode_steps(llm: LLM, prompts: list[list[int]], num_running: int,
                         num_steps: int = 24) -> dict[str, float]:
    """Drive the engine's own step loop with `num_running` sequences decoding, and measure per
    step: wall time, GPU kernel time (profiler, union of kernel intervals), host time in
    schedule + update, and the GPU busy fraction (kernel time / wall time between steps)."""
    from torch.profiler import ProfilerActivity, profile

    sched, runner = llm.scheduler, llm.model_runner
    base = 10**9 + num_running * 1000
    for i in range(num_running):
        sched.add_request(base + i, prompts[i % len(prompts)][:256], 10**6 // 1000,
                          ignore_eos=True, temperature=0.6, seed=i)

    # The engine's loop: with async scheduling step N+1 is launched before step N's ids are
    # read back and passed to update().
    depth = 2 if llm.config.async_scheduling else 1
    in_flight: list[Any] = []

    def step() -> tuple[float, bool]:
        """One schedule + launch, then (once `depth` steps are in flight) read back + update the
        oldest. Returns the host time in schedule + update and whether the step was decode-only."""
        t0 = time.perf_counter()
        batch = runner.schedule(sched)
        t1 = time.perf_counter()
        result = runner.launch(batch, staged=True)
        if batch.num_samples:  # a Batch without sampled rows needs no update()
            in_flight.append(result)
        host = t1 - t0
        while len(in_flight) >= depth:
            tokens = in_flight.pop(0).result()
            t2 = time.perf_counter()
            sched.update(tokens)
            host += time.perf_counter() - t2
        return host, batch.num_decodes == batch.num_seqs

    while not step()[1]:  # prefill everything, then a few decode steps to settle
        pass
    for _ in range(5):
        step()
    host = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        w0 = time.perf_counter()
        for _ in range(num_steps):
            host.append(step()[0])
        torch.cuda.synchronize()
        window = time.perf_counter() - w0
    while in_flight:
        sched.update(in_flight.pop(0).result())
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
    for i in range(num_running):
        sched.abort(base + i)
    wall_step = window / num_steps
    gpu_step = busy_us * 1e-6 / num_steps
    return {
        "running": num_running,
        "wall_us_per_step": wall_step * 1e6,
        "gpu_us_per_step": gpu_step * 1e6,
        "gpu_busy": gpu_step / wall_step,
        "host_idle_us_per_step": (wall_step - gpu_step) * 1e6,
        "schedule_update_us_median": float(np.median(host)) * 1e6,
    }


# ---- the peer: transformers continuous batching ------------------------------------------------


def run_peer(model_dir: str, prompts: list[list[int]], max_tokens: list[int]) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).to("cuda").eval()
    # generate_batch takes one max_new_tokens for all requests: the mean of theirs.
    new_tokens = round(float(np.mean(max_tokens)))
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=True, temperature=0.6, top_k=0,
                           top_p=1.0, eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=[p[:128] for p in prompts[:8]],
                         generation_config=GenerationConfig(
                             max_new_tokens=16, do_sample=True, temperature=0.6,
                             eos_token_id=None, pad_token_id=0))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=gen)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    num_out = sum(len(r.generated_tokens) for r in results.values())
    num_in = sum(len(p) for p in prompts)
    del model
    torch.cuda.empty_cache()
    return {"seconds": elapsed, "requests": len(prompts), "max_new_tokens": new_tokens,
            "output_tokens": num_out, "output_tok_s": num_out / elapsed,
            "total_tok_s": (num_out + num_in) / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out/throughput.json")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers' generate_batch")
    ap.add_argument("--peer-requests", type=int, default=64,
                    help="run the peer on the first N requests (it is slow)")
    ap.add_argument("--no-python", action="store_true", help="skip the scheduler='python' run")
    ap.add_argument("--num-seqs", type=int, default=NUM_SEQS)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (engine default)")
    ap.add_argument("--no-async", action="store_true",
                    help="async_scheduling=False: the host's work is not hidden behind the GPU")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_throughput needs a CUDA GPU")

    prompts, max_tokens = nano_vllm_workload(args.num_seqs)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "card": torch.cuda.get_device_name(),
        "workload": {"requests": len(prompts), "prompt_tokens": sum(map(len, prompts)),
                     "output_tokens": sum(max_tokens)},
    }
    bw, rate = measure_copy_bandwidth(), measure_matmul_rate()
    results["copy_bandwidth_GBps"], results["matmul_TFLOPs"] = bw / 1e9, rate / 1e12
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_demo_checkpoint(Path(tmp) / "qwen3-0.6b", "qwen3-0.6b",
                                             write_weights=False))
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        roof = roofline_seconds(cfg, prompts, max_tokens, bw, rate)
        results["roofline"] = roof
        layers = cfg["num_hidden_layers"]
        heads, hd = cfg["num_attention_heads"], cfg["head_dim"]
        cost = StepCost(
            weight_bytes=roof["weight_bytes"],
            kv_bytes_per_token=2 * layers * 2 * cfg["num_key_value_heads"] * hd,
            flops_per_token=roof["weight_bytes"],  # 2 FLOPs per bf16 weight (2 bytes)
            attn_flops_per_pair=4 * layers * heads * hd,  # q.k and p.v
            bw=bw,
            rate=rate,
        )
        engine_args: dict[str, Any] = {"enforce_eager": args.enforce_eager}
        if args.block_size is not None:
            engine_args["block_size"] = args.block_size
        if args.no_async:
            engine_args["async_scheduling"] = False
        results["engine_args"] = engine_args
        results["cpp"] = run_minivllm(model_dir, prompts, max_tokens, cost=cost, **engine_args)
        if not args.no_python:
            results["python"] = run_minivllm(model_dir, prompts, max_tokens, scheduler="python",
                                             **engine_args)
        if not args.no_peer:
            n = min(args.peer_requests, len(prompts))
            try:
                results["peer"] = run_peer(model_dir, prompts[:n], max_tokens[:n])
            except Exception as e:  # noqa: BLE001 -- the peer's API moves between transformers releases
                results["peer"] = {"error": f"{type(e).__name__}: {e}"}

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    roof_tok_s = results["workload"]["output_tokens"] / roof["total_s"]
    print(f"\ncard: {results['card']}; copy {bw / 1e9:,.0f} GB/s; bf16 matmul {rate / 1e12:,.0f} "
          f"TFLOP/s; roofline {roof['total_s']:.2f} s (decode {roof['decode_s']:.2f} s, prefill "
          f"{roof['prefill_s']:.2f} s) = {roof_tok_s:,.0f} output tok/s")
    print(f"{'run':<28}{'seconds':>9}{'out tok/s':>12}{'total tok/s':>13}{'of roofline':>13}")
    for key, label in (("cpp", "minivllm (cpp scheduler)"), ("python", "minivllm (python sched.)"),
                       ("peer", "transformers generate_batch")):
        r = results.get(key)
        if r is None:
            continue
        if "error" in r:
            print(f"{label:<28} failed: {r['error'][:120]}")
            continue
        frac = r["output_tok_s"] / roof_tok_s
        note = f"  ({r['requests']} requests, {r['max_new_tokens']} new each)" if key == "peer" else ""
        print(f"{label:<28}{r['seconds']:>9.2f}{r['output_tok_s']:>12,.0f}{r['total_tok_s']:>13,.0f}"
              f"{frac:>12.1%}{note}")
    steps = results["cpp"].get("steps")
    if steps:
        print(f"\ncpp run: {steps['num_steps']} steps, {steps['seconds_in_steps']:.2f} s from GPU "
              f"start to ids read back, {steps['seconds_outside']:.2f} s outside")
        print(f"{'step kind':<20}{'steps':>7}{'seconds':>9}{'roofline s':>12}{'efficiency':>12}")
        for kind, g in steps["by_kind"].items():
            print(f"{kind:<20}{g['steps']:>7}{g['seconds']:>9.2f}{g['roofline_s']:>12.2f}"
                  f"{g['roofline_s'] / g['seconds']:>12.1%}")
        print("slowest steps:", ", ".join(
            f"{st['ms']:.1f} ms at {st['offset_s']:.2f} s ({st['tokens']} tokens, {st['decodes']} "
            f"decodes, roofline {st['roofline_ms']:.1f} ms)" for st in steps["slowest_steps"]))
        print("Triton compiles during the timed run:",
              results["cpp"]["triton_compiles_during_run"] or "none")
    print(f"\n{'decode steps':<28}{'wall us':>9}{'gpu us':>9}{'busy':>7}{'idle us':>9}{'sched+upd us':>14}")
    for key in ("cpp", "python"):
        for n, d in results.get(key, {}).get("decode_profile", {}).items():
            print(f"{key + ' @ ' + n + ' running':<28}{d['wall_us_per_step']:>9.0f}"
                  f"{d['gpu_us_per_step']:>9.0f}{d['gpu_busy']:>7.1%}"
                  f"{d['host_idle_us_per_step']:>9.0f}{d['schedule_update_us_median']:>14.1f}")


if __name__ == "__main__":
    main()
