"""How long does one request wait for its first token, and for each token after it, against the
card's limit?

  * Time to first token of a lone prompt of 128, 512, 1k, 2k, 4k and 8k tokens (max_tokens=1),
    read two ways: `RequestOutput.metrics.time_to_first_token` (arrival to first token, inside
    `LLM.generate`) and the wall time of the whole `generate` call; and the TTFT of the
    engine's first prompt of that length, which is also its first step of that size. Roofline: the prefill's
    matmul and causal-attention FLOPs at the measured matmul rate (never less than one read of
    the weights).
  * Time per output token with 1, 8, 32, 64, 128 and 256 requests running (prompts of
    --prompt-len tokens, --decode-tokens tokens each, started together): from the metrics
    (first token to finish, over the tokens after the first, of the request whose first token
    came last, so no prefill overlaps its decode), and directly, (wall of generate at
    --decode-tokens - wall at 1) / (--decode-tokens - 1).
    Roofline: one decode step reading the weights and every running request's KV (at the
    decode's mean context) at the measured bandwidth (roofline.py).
Every prompt is fresh random ids, so the prefix cache never hits; the median of --repeats runs
after an untimed one. Qwen3-0.6B's shape by default (--model-shape 8b / 14b), dummy weights,
bf16. Prints both tables; writes JSON to --out and a plot beside it (matplotlib, the `bench`
extra). --smoke: a tiny random model on the CPU with small sizes (a check of the script).

    python benchmarks/bench_latency.py [--model-shape 0.6b] [--out benchmarks/out/latency.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import device_info, maybe_pyplot, print_table, write_json
from minivllm import LLM, SamplingParams
from roofline import Ceilings, ModelCost
from workload import MODEL_SHAPES, engine_args, make_model_dir

PROMPT_LENS = (128, 512, 1024, 2048, 4096, 8192)
RUNNING = (1, 8, 32, 64, 128, 256)
SMOKE_PROMPT_LENS, SMOKE_RUNNING = (16, 48), (1, 3)


class Prompts:
    """Fresh random prompts (ids below the vocabulary), never seen before by the prefix cache."""

    def __init__(self, vocab_size: int) -> None:
        self.rng, self.vocab_size = np.random.default_rng(0), min(vocab_size, 10000)

    def take(self, num: int, length: int) -> list[list[int]]:
        return self.rng.integers(0, self.vocab_size, (num, length)).tolist()


def timed_generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[Any]]:
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0, outs


def first_token(
    llm: LLM, prompts: Prompts, length: int, repeats: int, cost: ModelCost, ceilings: Ceilings
) -> dict[str, float]:
    ttft, wall = [], []
    for run in range(repeats + 1):
        seconds, outs = timed_generate(llm, prompts.take(1, length), 1)
        ttft.append(outs[0].metrics.time_to_first_token)
        wall.append(seconds)
    # Run 0 is the engine's first step of this shape (its first replay of that graph): reported
    # apart, left out of the medians.
    first, ttft, wall = ttft[0], ttft[1:], wall[1:]
    return {
        "prompt_len": length,
        "first_ttft_ms": first * 1e3,
        "ttft_ms": float(np.median(ttft)) * 1e3,
        "generate_ms": float(np.median(wall)) * 1e3,
        "roofline_ms": cost.prefill_seconds(length, ceilings) * 1e3,
    }


def per_token(
    llm: LLM,
    prompts: Prompts,
    running: int,
    prompt_len: int,
    decode_tokens: int,
    repeats: int,
    cost: ModelCost,
    ceilings: Ceilings,
) -> dict[str, float]:
    from_metrics, direct = [], []
    for run in range(repeats + 1):
        wall_one, _ = timed_generate(llm, prompts.take(running, prompt_len), 1)
        wall_all, outs = timed_generate(llm, prompts.take(running, prompt_len), decode_tokens)
        if run == 0:  # warms up this batch size's steps
            continue
        # The request that got its first token last: its decode overlaps no other's prefill.
        last = max((o.metrics for o in outs), key=lambda m: m.first_token_time)
        from_metrics.append((last.finished_time - last.first_token_time) / (decode_tokens - 1))
        direct.append((wall_all - wall_one) / (decode_tokens - 1))
    mean_context = running * (prompt_len + decode_tokens / 2)
    return {
        "running": running,
        "ms_per_token": float(np.median(from_metrics)) * 1e3,
        "direct_ms_per_token": float(np.median(direct)) * 1e3,
        "roofline_ms": cost.decode_seconds(mean_context, ceilings) * 1e3,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    plt = maybe_pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ttft = results["first_token"]
    x = [r["prompt_len"] for r in ttft]
    left.plot(x, [r["ttft_ms"] for r in ttft], marker="o", label="RequestMetrics TTFT")
    left.plot(x, [r["generate_ms"] for r in ttft], marker="s", label="generate() wall")
    left.plot(x, [r["roofline_ms"] for r in ttft], "k--", label="roofline")
    left.set_xscale("log", base=2)
    left.set(yscale="log", xlabel="prompt tokens (one request)", ylabel="ms")
    left.set_title("time to first token")
    tpot = results["per_token"]
    x = [r["running"] for r in tpot]
    right.plot(x, [r["ms_per_token"] for r in tpot], marker="o", label="RequestMetrics")
    right.plot(x, [r["direct_ms_per_token"] for r in tpot], marker="s", label="generate() wall")
    right.plot(x, [r["roofline_ms"] for r in tpot], "k--", label="roofline")
    right.set_xscale("log", base=2)
    right.set(xlabel="requests running", ylabel="ms per output token")
    right.set_title(f"decode, {results['prompt_len']}-token prompts")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['device']}, {results['model_shape']}, {results['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out/latency.json")
    ap.add_argument("--model-shape", default="0.6b", choices=list(MODEL_SHAPES))
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=list(PROMPT_LENS))
    ap.add_argument("--running", type=int, nargs="+", default=list(RUNNING))
    ap.add_argument("--prompt-len", type=int, default=512, help="prompt of the decode runs")
    ap.add_argument("--decode-tokens", type=int, default=128, help="tokens per decode run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="the engine's (default: the longest run + 16); a server's 32k or 40k widens the "
        "block tables, and with them the decode attention's split grid",
    )
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, in seconds")
    args = ap.parse_args()
    if args.smoke:
        args.prompt_lens, args.running = list(SMOKE_PROMPT_LENS), list(SMOKE_RUNNING)
        args.prompt_len, args.decode_tokens, args.repeats = 16, 4, 1
    if args.decode_tokens < 2:
        raise SystemExit("--decode-tokens must be at least 2")

    info = device_info()
    ceilings = Ceilings.measure()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_model_dir(tmp, args.model_shape, smoke=args.smoke))
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        longest = max(*args.prompt_lens, args.prompt_len + args.decode_tokens)
        llm = LLM(
            model_dir,
            max_model_len=max(args.max_model_len or 0, longest + 16),
            max_num_seqs=max(max(args.running), 1),
            max_num_batched_tokens=max(8192, max(args.prompt_lens)),
            **engine_args(args.smoke),
        )
    cost, prompts = ModelCost.from_config(cfg), Prompts(cfg["vocab_size"])
    results: dict[str, Any] = {
        **info,
        "model_shape": "tiny (smoke)" if args.smoke else args.model_shape,
        "ceilings": ceilings.as_dict(),
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "max_model_len": llm.config.max_model_len,
    }
    results["first_token"] = [
        first_token(llm, prompts, n, args.repeats, cost, ceilings) for n in args.prompt_lens
    ]
    results["per_token"] = [
        per_token(
            llm, prompts, n, args.prompt_len, args.decode_tokens, args.repeats, cost, ceilings
        )
        for n in args.running
    ]
    llm.close()
    write_json(args.out, results)
    plot(results, Path(args.out).with_suffix(".png"))
    print(
        f"\n{results['device']}, {results['model_shape']}: bandwidth "
        f"{ceilings.bandwidth / 1e9:,.0f} GB/s, bf16 matmul {ceilings.matmul_tflops:,.0f} TFLOP/s"
    )
    print_table(
        results["first_token"],
        ["prompt_len", "first_ttft_ms", "ttft_ms", "generate_ms", "roofline_ms"],
    )
    print()
    print_table(
        results["per_token"], ["running", "ms_per_token", "direct_ms_per_token", "roofline_ms"]
    )


if __name__ == "__main__":
    main()
