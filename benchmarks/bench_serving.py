"""Online serving: `minivllm serve` under load, measured as `vllm bench serve` measures it.

Workload (workload.py: nano-vllm's bench.py, as bench_throughput.py runs it offline): seed 0;
256 requests; prompt ids uniform 0..10000 with lengths uniform 100..1024; max_tokens uniform
100..1024, ignore_eos, temperature 0.6 (request i with seed i). Every request streams (SSE) through
/v1/completions with usage in its last chunk. The client is httpx on asyncio, one process; it
reads raw bytes and parses only the usage chunk, so it stays cheaper than the server.

Runs, one after another on one server:
  * Poisson arrivals at each of --rates (requests/s; `inf` sends all at once);
  * fixed concurrency at each of --concurrency (all queued, at most C in flight);
  * one request at a time (--single requests): the streamed inter-token latency, whose p50 is
    compared with the engine's own per-token time, LLM.generate on the same requests one at a
    time in the same run (after the server has stopped, on the same GPU).
The offline reference also runs the whole workload through LLM.generate at once: the
saturated HTTP output tok/s over that is the serving overhead's measure.

Per run: request throughput, output and total tok/s, and TTFT, TPOT, ITL and end-to-end latency
(mean, p50, p90, p99, ms). TPOT: a request's (latency - TTFT) / (output tokens - 1). ITL: the gap
between consecutive reads of a stream that brought tokens. Writes JSON (--out) and a PNG of
latency against request rate (if matplotlib is installed); prints a table last.

    python benchmarks/bench_serving.py --out bench_out/serving.json      # GPU: Qwen3-0.6B shape
    python benchmarks/bench_serving.py --smoke                           # CPU, tiny, < 1 minute
    python benchmarks/bench_serving.py --url http://host:8000 --model-name NAME   # a running server
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serve_process import SERVED_NAME, cpu_seconds, free_port, serve_command, wait_healthy
from serving_client import TEMPERATURE, run_load, stats_ms, summarize
from workload import NUM_SEQS, nano_vllm_workload

# --smoke: the first requests of the workload, short, on the tiny checkpoint on the CPU.
SMOKE_NUM_SEQS, SMOKE_PROMPT_LEN, SMOKE_OUTPUT_LEN = 8, 32, 16


# ---- the engine's arguments and the offline reference ------------------------------------------


def engine_args(smoke: bool, load_format: str) -> dict[str, Any]:
    if smoke:
        return {"device": "cpu", "max_model_len": 512, "seed": 0}
    return {"dtype": "bfloat16", "load_format": load_format, "max_model_len": 4096, "seed": 0}


def offline_reference(
    model: str,
    args: dict[str, Any],
    prompts: list[list[int]],
    max_tokens: list[int],
    num_single: int,
) -> dict[str, Any]:
    """LLM.generate on the same requests: all at once (output tok/s), then the first
    `num_single` one at a time (the engine's per-token time: (latency - TTFT) / (n - 1))."""
    from minivllm import LLM, SamplingParams

    llm = LLM(model, **args)
    params = [
        SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=n, seed=i)
        for i, n in enumerate(max_tokens)
    ]
    llm.generate([p[:64] for p in prompts[:4]], params[:4], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    per_token = []
    for p, sp in zip(prompts[:num_single], params[:num_single]):
        (o,) = llm.generate([p], sp, use_tqdm=False)
        m, n = o.metrics, len(o.outputs[0].token_ids)
        per_token.append((m.latency - m.time_to_first_token) / (n - 1))
    llm.close()
    return {
        "output_tok_s": num_out / elapsed,
        "duration_s": elapsed,
        "output_tokens": num_out,
        "per_token_ms": stats_ms(per_token),
    }


# ---- report ------------------------------------------------------------------------------------


def print_table(report: dict[str, Any]) -> None:
    head = (
        f"{'run':<18}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'p99':>9}"
        f"{'TPOT p50':>10}{'p99':>8}{'ITL p50':>9}{'p99':>8}{'E2E p50':>10}{'fail':>6}"
    )
    print("\n" + head)
    print("-" * len(head))
    for run in report["runs"]:
        s = run["summary"]
        print(
            f"{run['name']:<18}{s['request_throughput']:>8.2f}{s['output_tok_s']:>11,.0f}"
            f"{s['ttft_ms']['p50']:>10.1f}{s['ttft_ms']['p99']:>9.1f}"
            f"{s['tpot_ms']['p50']:>10.2f}{s['tpot_ms']['p99']:>8.2f}"
            f"{s['itl_ms']['p50']:>9.2f}{s['itl_ms']['p99']:>8.2f}"
            f"{s['e2el_ms']['p50']:>10.0f}{s['failed']:>6}"
        )
    ref = report.get("offline")
    if ref:
        print(
            f"\noffline LLM.generate, same requests: {ref['output_tok_s']:,.0f} output tok/s; "
            f"per-token time one at a time p50 {ref['per_token_ms']['p50']:.2f} ms"
        )
    for name, value in report.get("ratios", {}).items():
        print(f"{name}: {value:.3f}")


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return
    runs = [r for r in report["runs"] if r["mode"] == "rate"]
    if not runs:
        return
    finite = [r["rate"] for r in runs if r["rate"] != "inf"]
    inf_x = (max(finite) * 2) if finite else 1.0
    xs = [inf_x if r["rate"] == "inf" else r["rate"] for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("ttft_ms", "TTFT"), ("e2el_ms", "end to end")):
        for q in ("p50", "p99"):
            axes[0].plot(xs, [r["summary"][key][q] for r in runs], marker="o", label=f"{label} {q}")
    for key, label in (("tpot_ms", "TPOT"), ("itl_ms", "ITL")):
        for q in ("p50", "p99"):
            axes[1].plot(xs, [r["summary"][key][q] for r in runs], marker="o", label=f"{label} {q}")
    for ax, title in zip(axes, ("request latency (ms)", "per-token latency (ms)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("request rate (req/s; rightmost: all at once)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"minivllm serve, {report['config']['workload']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ---- main --------------------------------------------------------------------------------------


def parse_rates(text: str) -> list[float]:
    return [math.inf if r.strip() == "inf" else float(r) for r in text.split(",") if r.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--model-name", default=SERVED_NAME, help="the model name with --url")
    p.add_argument("--model", default=None, help="checkpoint folder (default: Qwen3-0.6B shape)")
    p.add_argument("--load-format", default=None, choices=["auto", "dummy"])
    p.add_argument("--num-prompts", type=int, default=NUM_SEQS)
    p.add_argument("--rates", default="4,8,16,32,inf", help="Poisson request rates, req/s")
    p.add_argument("--concurrency", default="32,128", help="fixed-concurrency runs")
    p.add_argument("--single", type=int, default=5, help="requests sent one at a time")
    p.add_argument("--no-offline", action="store_true", help="skip the LLM.generate reference")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--clients", type=int, default=4, help="client processes sending the requests")
    p.add_argument("--smoke", action="store_true", help="tiny checkpoint on the CPU, seconds")
    p.add_argument("--out", default="bench_out/serving.json")
    args = p.parse_args()

    prompts, max_tokens = nano_vllm_workload(args.num_prompts)
    rates, concurrency = parse_rates(args.rates), [int(c) for c in args.concurrency.split(",") if c]
    workload = f"nano-vllm workload, {len(prompts)} requests"
    tmp = tempfile.TemporaryDirectory(prefix="minivllm-bench-serving-")
    model, load_format = args.model, args.load_format or ("auto" if args.model else "dummy")
    if args.smoke:
        from minivllm.demo import make_demo_checkpoint

        model = model or str(make_demo_checkpoint(Path(tmp.name) / "tiny", "tiny"))
        prompts, max_tokens = nano_vllm_workload(SMOKE_NUM_SEQS)
        prompts = [[t % 512 for t in q[:SMOKE_PROMPT_LEN]] for q in prompts]
        max_tokens = [min(m, SMOKE_OUTPUT_LEN) for m in max_tokens]
        rates, concurrency = [16.0, math.inf], [4]
        args.single = min(args.single, 2)
        load_format = "auto"
        workload = f"smoke: {len(prompts)} short requests, tiny model on the CPU"
    elif model is None and args.url is None:
        from minivllm.demo import make_demo_checkpoint

        model = str(
            make_demo_checkpoint(Path(tmp.name) / "qwen3-0.6b", "qwen3-0.6b", write_weights=False)
        )
    eargs = engine_args(args.smoke, load_format)

    server = log = None
    base_url = args.url.rstrip("/") if args.url else None
    name = args.model_name if args.url else SERVED_NAME
    if base_url is None:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        log = Path(tmp.name) / "server.log"
        with log.open("w") as f:
            server = subprocess.Popen(
                serve_command(model, port, eargs),
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=tmp.name,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        wait_healthy(base_url, server, log, args.startup_timeout)
    url = f"{base_url}/v1/completions"
    report: dict[str, Any] = {
        "config": {
            "workload": workload,
            "engine_args": eargs,
            "url": args.url,
            "num_prompts": len(prompts),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "gpu": _gpu_name(),
        },
        "runs": [],
    }
    try:
        # Warm-up: a few short requests through the whole path.
        run_load(url, name, [q[:32] for q in prompts[:4]], [8] * 4)
        plan = [("rate", r, None) for r in rates] + [
            ("concurrency", math.inf, c) for c in concurrency
        ]
        for mode, rate, conc in plan:
            cpu_before = cpu_seconds(server)
            results, duration, client_cpu = run_load(
                url, name, prompts, max_tokens, rate, conc, args.clients
            )
            cpu = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_seconds(server).items()}
            cpu["client"] = client_cpu
            label = f"rate {rate:g}/s" if mode == "rate" else f"concurrency {conc}"
            report["runs"].append(
                {
                    "name": label,
                    "mode": mode,
                    "rate": "inf" if rate == math.inf else rate,
                    "concurrency": conc,
                    "summary": summarize(results, duration),
                    # CPU seconds each process used over the run: which one bounds it.
                    "cpu_s": cpu,
                }
            )
            busy = ", ".join(f"{k} {100 * v / duration:.0f}%" for k, v in cpu.items())
            print(f"{label}: done in {duration:.1f} s (CPU busy: {busy})", flush=True)
        n = min(args.single, len(prompts))
        results, duration, _ = run_load(url, name, prompts[:n], max_tokens[:n], concurrency=1)
        report["runs"].append(
            {
                "name": "one at a time",
                "mode": "single",
                "rate": None,
                "concurrency": 1,
                "summary": summarize(results, duration),
            }
        )
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    if not args.no_offline and args.url is None:
        ref = offline_reference(model, eargs, prompts, max_tokens, args.single)
        report["offline"] = ref
        saturated = max(r["summary"]["output_tok_s"] for r in report["runs"])
        single = report["runs"][-1]["summary"]["itl_ms"]["p50"]
        report["ratios"] = {
            "best HTTP output tok/s / offline": saturated / ref["output_tok_s"],
            "single-request ITL p50 / engine per-token p50": single / ref["per_token_ms"]["p50"],
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_clean(report), indent=2))
    print(f"wrote {out}")
    plot(report, out.with_suffix(".png"))
    print_table(report)
    tmp.cleanup()
    return 0


def _clean(x: Any) -> Any:
    """NaN (a percentile of nothing) as JSON null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
