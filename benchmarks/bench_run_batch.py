"""Does `minivllm run-batch` cost anything over `LLM.generate`, and how do replicas scale?

  * One engine: the nano-vllm workload (256 requests: token-id prompts of 100..1024 tokens,
    max_tokens 100..1024, temperature 0.6, ignore_eos) written as an OpenAI batch file of
    /v1/completions lines, run through `run_batch` on a warmed engine (`llm=`: the file's
    reading, parsing and validation, the responses and the writing, everything but start-up),
    against `LLM.generate` of the same requests on the same engine, alternated --repeats times
    after an untimed round of both (each run's prompt ids shifted, so none hits the prefix
    cache). Overhead: the median run-batch time over the median generate time, minus one (the target
    is at most 3%).
  * Replicas (with two GPUs or more): the same file through the data-parallel path without Ray
    (`--no-ray --data-parallel k`: one engine process per GPU) for k in --replicas (as many as
    there are GPUs), timed from when every replica is up to the last result (start-up and
    shut-down are reported apart). Strong scaling: the 256 requests
    shared by the k replicas; weak scaling: 256 per replica (the workload's draws extended).
    Scaling efficiency: throughput at k over k times the throughput at 1 (same path).

Qwen3-0.6B's shape, dummy weights, bf16 (workload.py). Prints a table; writes JSON to --out.
--smoke: the tiny random model on the CPU, workload.py's smoke requests, one timed round,
replicas 1 and 2 (strong) on the CPU: a check of the script, not a measurement.

    python benchmarks/bench_run_batch.py [--out benchmarks/out/run_batch.json]
    python benchmarks/bench_run_batch.py --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import device_info, write_json
from minivllm import LLM, SamplingParams
from minivllm.entrypoints.run_batch import run_batch
from workload import NUM_SEQS, engine_args, make_model_dir, nano_vllm_workload, smoke_workload

MAX_OVERHEAD = 0.03


def workload(num: int, smoke: bool, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """The nano-vllm workload's first `num` requests (all of the smoke workload's with --smoke)."""
    return smoke_workload(vocab_size) if smoke else nano_vllm_workload(num)


def variant(prompts: list[list[int]], v: int, vocab_size: int) -> list[list[int]]:
    """The prompts with every id shifted by v (mod the ids' range): the same lengths and cost,
    but blocks the prefix cache has not seen, so every timed run starts cold as in
    bench_throughput's single run."""
    modulus = min(vocab_size, 10001)
    return [[(t + 7919 * v) % modulus for t in p] for p in prompts]


def write_batch_file(
    path: Path, model: str, prompts: list[list[int]], max_tokens: list[int]
) -> Path:
    with open(path, "w") as f:
        for i, (p, m) in enumerate(zip(prompts, max_tokens)):
            body = {
                "model": model,
                "prompt": p,
                "max_tokens": m,
                "temperature": 0.6,
                "ignore_eos": True,
            }
            line = {
                "custom_id": f"request-{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": body,
            }
            f.write(json.dumps(line) + "\n")
    return path


def one_engine(
    model: str,
    engine_args: dict[str, Any],
    prompts: list[list[int]],
    max_tokens: list[int],
    vocab_size: int,
    repeats: int,
    tmp: Path,
) -> dict[str, Any]:
    """generate and run-batch on one warmed engine, alternated, each run on fresh prompts."""
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]
    llm = LLM(model, **engine_args)
    generate_s: list[float] = []
    run_batch_s: list[float] = []
    num_output = sum(max_tokens)
    runs = iter(range(2 * repeats + 2))

    def time_generate() -> None:
        fresh = variant(prompts, next(runs), vocab_size)
        start = time.perf_counter()
        outs = llm.generate(fresh, params, use_tqdm=False)
        generate_s.append(time.perf_counter() - start)
        assert sum(len(o.outputs[0].token_ids) for o in outs) == num_output

    def time_run_batch() -> None:
        v = next(runs)
        path = write_batch_file(
            tmp / f"one_engine_{v}.jsonl", model, variant(prompts, v, vocab_size), max_tokens
        )
        out = path.with_suffix(".out.jsonl")
        s = run_batch(str(path), str(out), model, llm=llm, use_tqdm=False)
        assert s.num_ok == len(prompts) and s.num_output_tokens == num_output, s
        run_batch_s.append(s.elapsed_s)

    time_generate()  # untimed warm-up of both (first batch sizes, imports)
    time_run_batch()
    generate_s.clear()
    run_batch_s.clear()
    for i in range(repeats):  # alternate, so drift in the card's speed hits both alike
        if i % 2:
            time_run_batch()
            time_generate()
        else:
            time_generate()
            time_run_batch()
    llm.close()
    gen, rb = statistics.median(generate_s), statistics.median(run_batch_s)
    return {
        "generate_s": generate_s,
        "run_batch_s": run_batch_s,
        "generate_output_tok_s": num_output / gen,
        "run_batch_output_tok_s": num_output / rb,
        "overhead": rb / gen - 1,
    }


def replicas(
    model: str,
    engine_args: dict[str, Any],
    counts: list[int],
    scaling: list[str],
    smoke: bool,
    vocab_size: int,
    tmp: Path,
) -> list[dict[str, Any]]:
    """Each replica count and scaling through the no-Ray data-parallel path."""
    rows = []
    for k in counts:
        for mode in scaling:
            if k == 1 and mode == "weak":
                continue  # the same run as strong at 1
            prompts, max_tokens = workload(
                NUM_SEQS * (k if mode == "weak" else 1), smoke, vocab_size
            )
            num = len(prompts)
            path = write_batch_file(tmp / f"dp_{mode}_{k}.jsonl", model, prompts, max_tokens)
            out = path.with_suffix(".out.jsonl")
            s = run_batch(
                str(path),
                str(out),
                model,
                data_parallel_size=k,
                use_ray=False,
                use_tqdm=False,
                **engine_args,
            )
            assert s.num_ok == num and s.run_s is not None, s
            rows.append(
                {
                    "replicas": k,
                    "scaling": mode,
                    "requests": num,
                    "output_tokens": s.num_output_tokens,
                    "run_s": s.run_s,
                    "start_stop_s": s.elapsed_s - s.run_s,
                    "output_tok_s": s.num_output_tokens / s.run_s,
                }
            )
    one = next((r["output_tok_s"] for r in rows if r["replicas"] == 1), None)
    for r in rows:
        r["efficiency"] = r["output_tok_s"] / (r["replicas"] * one) if one else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out/run_batch.json")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (a check)")
    ap.add_argument("--repeats", type=int, default=3, help="generate / run-batch alternations")
    ap.add_argument("--replicas", default="1,2,4", help="replica counts (at most the GPUs)")
    ap.add_argument("--scaling", choices=["strong", "weak", "both"], default="both")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("bench_run_batch needs a CUDA GPU (or --smoke on the CPU)")
    num_gpus = torch.cuda.device_count() if cuda else 0
    results: dict[str, Any] = {"num_gpus": num_gpus, "smoke": args.smoke}
    with tempfile.TemporaryDirectory(prefix="bench-run-batch-") as tmp_dir:
        tmp = Path(tmp_dir)
        model = str(make_model_dir(tmp, smoke=args.smoke))
        eargs = engine_args(args.smoke)
        vocab_size = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        prompts, max_tokens = workload(NUM_SEQS, args.smoke, vocab_size)
        num = len(prompts)
        results["workload"] = {
            "requests": num,
            "prompt_tokens": sum(map(len, prompts)),
            "output_tokens": sum(max_tokens),
        }
        # The replicas first: this process has not touched a GPU yet, so each replica has its
        # card to itself.
        counts = [int(k) for k in args.replicas.split(",")]
        counts = [1, 2] if args.smoke else [k for k in counts if k <= num_gpus]
        scaling = ["strong", "weak"] if args.scaling == "both" else [args.scaling]
        if args.smoke:
            scaling = ["strong"]
        if len(counts) > 1:
            results["replicas"] = replicas(
                model, eargs, counts, scaling, args.smoke, vocab_size, tmp
            )
        else:
            results["replicas"] = f"not run: {num_gpus} GPU(s)"
        repeats = 1 if args.smoke else args.repeats
        results["one_engine"] = one_engine(
            model, eargs, prompts, max_tokens, vocab_size, repeats, tmp
        )
    results = {**device_info(), **results}
    write_json(args.out, results)
    one = results["one_engine"]
    print(
        f"\n{results['device']} x {num_gpus}; {num} requests, "
        f"{results['workload']['output_tokens']:,} output tokens"
    )
    print(f"{'one engine':<28}{'median s':>10}{'out tok/s':>12}")
    for label, key, rate in (
        ("LLM.generate", "generate_s", "generate_output_tok_s"),
        ("run-batch (llm=)", "run_batch_s", "run_batch_output_tok_s"),
    ):
        print(f"{label:<28}{statistics.median(one[key]):>10.2f}{one[rate]:>12,.0f}")
    if args.smoke:
        verdict = "smoke: fixed costs on a tiny run, not a measurement"
    else:
        verdict = "within" if one["overhead"] <= MAX_OVERHEAD else "OVER"
        verdict += f" the {MAX_OVERHEAD:.0%} target"
    print(f"run-batch overhead {one['overhead']:+.1%} ({verdict})")
    if isinstance(results["replicas"], list):
        print(
            f"\n{'replicas (no Ray)':<20}{'scaling':>8}{'requests':>10}{'run s':>8}"
            f"{'start+stop s':>14}{'out tok/s':>12}{'efficiency':>12}"
        )
        for r in results["replicas"]:
            print(
                f"{r['replicas']:<20}{r['scaling']:>8}{r['requests']:>10}{r['run_s']:>8.2f}"
                f"{r['start_stop_s']:>14.1f}{r['output_tok_s']:>12,.0f}{r['efficiency']:>12.1%}"
            )
    else:
        print(f"replicas: {results['replicas']}")


if __name__ == "__main__":
    main()
