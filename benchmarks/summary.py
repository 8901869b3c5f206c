"""The short table run_device.sh prints last: the headline figures of whatever ran into a folder.

python benchmarks/summary.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

KERNEL_LOGS = ("prefill_attention", "decode_attention", "decode_varlen", "gemm", "layer_chain",
               "small_kernels", "mixed_decode")  # fmt: skip


def load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def throughput(r: dict[str, Any]) -> None:
    c, roof = r["ceilings"], r["roofline"]
    tokens = r["workload"]["output_tokens"]
    roof_tok_s = tokens / roof["total_s"]
    copy_tok_s = tokens / r["roofline_at_copy_rate"]["total_s"]
    flop_tok_s = tokens / r.get("roofline_flop_aware", roof)["total_s"]
    print(f"\nthroughput, {r['model_shape']} (copy {c['copy_gbs']:,.0f} GB/s, read "
          f"{c['read_gbs']:,.0f} GB/s, matmul {c['matmul_tflops']:,.0f} TFLOP/s; roofline "
          f"{roof['total_s']:.2f} s)")  # fmt: skip
    for key in ("cpp", "python", "peer"):
        run = r.get(key)
        if run is None:
            continue
        if "error" in run:
            print(f"  {key:<7} failed: {run['error'][:100]}")
            continue
        print(f"  {key:<7}{run['seconds']:>7.2f} s {run['output_tok_s']:>9,.0f} out tok/s "
              f"{run['output_tok_s'] / roof_tok_s:>7.1%} of roofline "
              f"({run['output_tok_s'] / copy_tok_s:.1%} at the copy rate, "
              f"{run['output_tok_s'] / flop_tok_s:.1%} flop-aware)")  # fmt: skip
    for kind, g in r["cpp"].get("steps", {}).get("by_kind", {}).items():
        seconds = g["seconds"] if g["seconds"] > 0 else float("nan")
        flop_s = g.get("flop_aware_roofline_s", g["roofline_s"])
        print(f"    {kind:<18}{g['steps']:>5} steps {g['seconds']:>6.2f} s "
              f"{g['roofline_s'] / seconds:>7.1%} ({flop_s / seconds:.1%} flop-aware)")  # fmt: skip
    for n, d in r["cpp"].get("decode_probe", {}).items():
        busy = "-" if d["gpu_busy"] is None else f"{d['gpu_busy']:.1%}"
        print(f"    decode @ {n:>3} running: {d['wall_us_per_step']:,.0f} us per step, GPU busy "
              f"{busy}, schedule + update {d['schedule_update_us_median']:.0f} us")  # fmt: skip


def latency(r: dict[str, Any], name: str = "") -> None:
    print(f"\nlatency{name}, {r['model_shape']} (ms; roofline in brackets)")
    print("  TTFT   " + "  ".join(
        f"{x['prompt_len']}: {x['ttft_ms']:.1f} [{x['roofline_ms']:.1f}]" for x in r["first_token"]
    ))  # fmt: skip
    print("  /token " + "  ".join(
        f"{x['running']}: {x['ms_per_token']:.2f} [{x['roofline_ms']:.2f}]" for x in r["per_token"]
    ))  # fmt: skip


def serving(r: dict[str, Any]) -> None:
    print("\nserving (ms, p50)")
    for run in r.get("runs", []):
        m = run["summary"]
        print(f"  {run['name']:<18}{m['output_tok_s']:>9,.0f} out tok/s"
              f"  TTFT {m['ttft_ms']['p50']:>8.1f}  TPOT {m['tpot_ms']['p50']:>6.2f}"
              f"  ITL {m['itl_ms']['p50']:>6.2f}  failed {m['failed']}")  # fmt: skip


def host(r: dict[str, Any]) -> None:
    print("\nhost, median us per step")
    for row in r.get("scheduler", []):
        print(f"  block {row['block']:>3} {row['phase']:<11} C++ {row['cpp_median_us']:>7.1f}  "
              f"twin {row['twin_median_us']:>8.1f}")  # fmt: skip
    for row in r.get("step", []):
        phases = "  ".join(f"{k[:-3]} {v:,.0f}" for k, v in row.items() if k.endswith("_us"))
        print(f"  {row['step']:<13} {phases}")
    if r.get("graph_launch_us"):
        print("  graph launch us: " + ", ".join(
            f"{k}: {v:.0f}" for k, v in r["graph_launch_us"].items()
        ))  # fmt: skip


def workload(r: dict[str, Any]) -> None:
    print(f"\nGPU timeline, run {r['wall_s']:.2f} s (seconds: wall / idle)")
    for kind, k in sorted(r.get("kinds", {}).items()):
        print(f"  {kind:<16}{k['wall_s']:>7.2f}{k['wall_s'] - k['busy_s']:>7.2f}")
    alloc = r.get("allocator", {})
    print(f"  cudaMalloc {alloc.get('cuda_mallocs')}, allocator retries "
          f"{alloc.get('alloc_retries')}, Triton compiles {len(r.get('triton_compiles', []))}")  # fmt: skip
    for st in r.get("step_kernels", []):
        top = ", ".join(f"{name[:28]} {ms:.2f}" for name, _, ms in st["kernels"][:3])
        print(f"  step {st['step']} ({st['why']}, {st['tokens']} tokens): "
              f"{st['segment_ms']:.2f} ms; {top}")  # fmt: skip


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/out")
    card = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "?"
    commit = (out / "commit.txt").read_text().strip() if (out / "commit.txt").exists() else "?"
    print(f"\n==== summary: {card}, commit {commit} ====")
    if (out / "steps.txt").exists():
        print((out / "steps.txt").read_text().rstrip())
    tests = out / "gpu_tests.log"
    if tests.exists():
        lines = [ln for ln in tests.read_text().splitlines() if ln.strip()]
        print("tests/gpu:", lines[-1] if lines else "(no output)")
    for name, show in (("throughput.json", throughput), ("latency.json", latency),
                       ("serving.json", serving), ("host.json", host),
                       ("profile_workload.json", workload)):  # fmt: skip
        r = load(out, name)
        if r is not None:
            show(r)
    for path in sorted(out.glob("latency_*.json")):  # run_device.sh's latency_ab variants
        latency(json.loads(path.read_text()), f" {path.stem[len('latency_'):]}")
    for name in KERNEL_LOGS:
        log = out / f"{name}.log"
        if log.exists():
            print(f"\n{name} (last lines of {log.name}):")
            for line in log.read_text().splitlines()[-8:]:
                print("  " + line[:160])


if __name__ == "__main__":
    main()
