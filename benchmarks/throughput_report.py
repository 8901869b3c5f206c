"""bench_throughput.py's printed report: the roofline, the runs against it, where the C++
scheduler's run went by kind of step, and the decode probe; with --tp, one row per
tensor_parallel_size."""

from __future__ import annotations

from typing import Any


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
    flop = results.get("roofline_flop_aware", roof)
    flop_tok_s = results["workload"]["output_tokens"] / flop["total_s"]
    print(
        f"\n{results['device']}, {results['model_shape']}: copy {c['copy_gbs']:,.0f} GB/s, "
        f"read-only {c['read_gbs']:,.0f} GB/s, bf16 matmul {c['matmul_tflops']:,.0f} TFLOP/s; "
        f"roofline {roof['total_s']:.2f} s (decode {roof['decode_s']:.2f} s, prefill "
        f"{roof['prefill_s']:.2f} s) = {roof_tok_s:,.0f} output tok/s "
        f"({copy_tok_s:,.0f} at the copy rate; flop-aware {flop['total_s']:.2f} s, decode "
        f"{flop['decode_s']:.2f} s)"
    )
    print(f"{'run':<28}{'seconds':>9}{'out tok/s':>12}{'total tok/s':>13}{'of roofline':>13}"
          f"{'at copy rate':>14}{'flop-aware':>12}")  # fmt: skip
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
            f"{r['output_tok_s'] / roof_tok_s:>13.1%}{r['output_tok_s'] / copy_tok_s:>14.1%}"
            f"{r['output_tok_s'] / flop_tok_s:>12.1%}{note}"
        )
    steps = results["cpp"].get("steps")
    if steps:
        print(
            f"\ncpp run: {steps['num_steps']} steps, {steps['seconds_in_steps']:.2f} s from GPU "
            f"start to ids read back, {steps['seconds_outside']:.2f} s outside"
        )
        print(f"{'step kind':<20}{'steps':>7}{'seconds':>9}{'roofline s':>12}{'of roofline':>13}"
              f"{'flop-aware':>12}")  # fmt: skip
        for kind, g in steps["by_kind"].items():
            seconds = g["seconds"] if g["seconds"] > 0 else float("nan")
            flop_s = g.get("flop_aware_roofline_s", g["roofline_s"])
            print(
                f"{kind:<20}{g['steps']:>7}{g['seconds']:>9.2f}{g['roofline_s']:>12.2f}"
                f"{g['roofline_s'] / seconds:>13.1%}{flop_s / seconds:>12.1%}"
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
