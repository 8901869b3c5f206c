"""The `minivllm` command: `demo`, `generate` and `bench`.

    minivllm demo                      random-weight Qwen3 made offline, a few chat prompts
    minivllm generate --model DIR --prompt "Hello" [--chat] [--max-tokens 64] ...
    minivllm bench [--model DIR] [--num-prompts 64]   synthetic throughput run

The CLI is the one place that prints; the library only logs. torch and the engine are imported
inside the commands, so `--help`, `--version` and argument errors answer at once. Every error is
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from minivllm import __version__
from minivllm.cli_args import (
    add_engine_args,
    add_sampling_args,
    engine_kwargs,
    positive_int,
    sampling_params,
)

DEMO_QUESTIONS = [
    "Introduce yourself.",
    "List all prime numbers within 100.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a transformer works.",
    "Give me your opinion on the impact of artificial intelligence on society.",
    "Tell me a joke about programmers.",
    "How does a paged KV cache work?",
]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) that points at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _report(outputs: list[Any], elapsed: float) -> None:
    num_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    ttfts = [o.metrics.time_to_first_token for o in outputs if o.metrics]
    ttft = sum(t for t in ttfts if t is not None) / max(len(ttfts), 1)
    requests = "1 request" if len(outputs) == 1 else f"{len(outputs)} requests"
    print(
        f"\n{requests}, {num_prompt} prompt + {num_output} output tokens in "
        f"{elapsed:.2f} s: {num_output / elapsed:,.0f} output tok/s, "
        f"{(num_prompt + num_output) / elapsed:,.0f} total tok/s, mean TTFT {ttft * 1000:.0f} ms"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from minivllm import LLM
    from minivllm.demo import make_demo_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("qwen3-0.6b" if device.startswith("cuda") else "tiny")
    with tempfile.TemporaryDirectory(prefix="minivllm-demo-") as tmp:
        folder = args.keep or tmp
        # Qwen3-0.6B's shape gets random weights in memory (no 1.5 GB file); tiny is written to
        # safetensors and loaded back, exercising the checkpoint loader.
        write_weights = size == "tiny"
        make_demo_checkpoint(
            folder,
            size=size,
            write_weights=write_weights,
            seed=args.seed or 0,
            decode_every_id=True,
        )
        print(
            f"minivllm demo: a random-weight Qwen3 ({size}) made offline in {folder}, on {device}"
        )
        print(
            "Random weights produce noise: this shows the engine running end to end, not a "
            "model that knows anything.\n"
        )
        kwargs = engine_kwargs(args)
        kwargs["device"] = device
        kwargs.setdefault("load_format", "auto" if write_weights else "dummy")
        kwargs.setdefault("max_model_len", 1024)
        llm = LLM(folder, **kwargs)
        questions = [DEMO_QUESTIONS[i % len(DEMO_QUESTIONS)] for i in range(args.num_prompts)]
        conversations = [[{"role": "user", "content": q}] for q in questions]
        sp = sampling_params(args)
        llm.chat(conversations[:1], sp, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = llm.chat(conversations, sp, use_tqdm=not args.no_progress)
        elapsed = time.perf_counter() - start
        for q, out in zip(questions, outputs):
            completion = out.outputs[0]
            print(f"\nPrompt:     {q!r}")
            print(
                f"Completion: {completion.text!r}  [{len(completion.token_ids)} tokens, "
                f"{completion.finish_reason}]"
            )
        _report(outputs, elapsed)
        if args.keep:
            load = "" if write_weights else ', load_format="dummy"'
            print(f"\nThe checkpoint stays in {folder}: LLM({folder!r}{load}) loads it.")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from minivllm import LLM

    llm = LLM(args.model, **engine_kwargs(args))
    sp = sampling_params(args)
    prompts = args.prompt
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat(
            [[{"role": "user", "content": p}] for p in prompts], sp, use_tqdm=not args.no_progress
        )
    else:
        outputs = llm.generate(prompts, sp, use_tqdm=not args.no_progress)
    elapsed = time.perf_counter() - start
    for p, out in zip(prompts, outputs):
        print(f"\nPrompt:     {p!r}")
        print(f"Completion: {out.outputs[0].text!r}  [{out.outputs[0].finish_reason}]")
    _report(outputs, elapsed)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    for kind in ("input", "output"):
        low, high = getattr(args, f"min_{kind}"), getattr(args, f"max_{kind}")
        if low > high:
            raise ValueError(
                f"--min-{kind}={low} is greater than --max-{kind}={high}; lengths are drawn "
                f"from [min, max], so give --min-{kind} <= --max-{kind}"
            )
    import numpy as np
    import torch

    from minivllm import LLM, SamplingParams
    from minivllm.demo import make_demo_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="minivllm-bench-") as tmp:
        model = args.model
        kwargs = engine_kwargs(args)
        kwargs["device"] = device
        if model is None:
            size = "qwen3-0.6b" if device.startswith("cuda") else "tiny"
            model = str(make_demo_checkpoint(tmp, size=size, write_weights=False))
            kwargs.setdefault("load_format", "dummy")
        llm = LLM(model, **kwargs)
        rng = np.random.default_rng(0)
        vocab = min(llm.config.model_config.vocab_size, 10000)
        prompts = [
            rng.integers(0, vocab, int(rng.integers(args.min_input, args.max_input + 1))).tolist()
            for _ in range(args.num_prompts)
        ]
        params = [
            SamplingParams(
                temperature=0.6,
                ignore_eos=True,
                max_tokens=int(rng.integers(args.min_output, args.max_output + 1)),
            )
            for _ in range(args.num_prompts)
        ]
        # Warm-up on a prompt of its own: one of the timed prompts would be a prefix-cache hit.
        warmup = rng.integers(0, vocab, args.min_input).tolist()
        llm.generate([warmup], SamplingParams(max_tokens=4), use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
        _report(outputs, time.perf_counter() - start)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minivllm", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"minivllm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a random-weight Qwen3 made offline")
    demo.add_argument(
        "--size",
        default=None,
        choices=["tiny", "qwen3-0.6b"],
        help="default: qwen3-0.6b on a GPU, tiny on the CPU",
    )
    demo.add_argument("--num-prompts", type=positive_int, default=8)
    demo.add_argument(
        "--keep", default=None, metavar="DIR", help="write the checkpoint to DIR and keep it"
    )
    demo.add_argument("--no-progress", action="store_true")
    add_engine_args(demo)
    add_sampling_args(demo, max_tokens=48)
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="complete prompts with a local checkpoint")
    gen.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    gen.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    gen.add_argument("--chat", action="store_true", help="apply the chat template")
    gen.add_argument("--no-progress", action="store_true")
    add_engine_args(gen)
    add_sampling_args(gen, max_tokens=64)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="synthetic throughput run (random token prompts)")
    bench.add_argument("--model", default=None, help="checkpoint folder (default: demo shape)")
    bench.add_argument("--num-prompts", type=positive_int, default=64)
    bench.add_argument("--min-input", type=positive_int, default=100, help="prompt tokens")
    bench.add_argument("--max-input", type=positive_int, default=512)
    bench.add_argument("--min-output", type=positive_int, default=100, help="output tokens")
    bench.add_argument("--max-output", type=positive_int, default=512)
    bench.add_argument("--no-progress", action="store_true")
    add_engine_args(bench)
    bench.set_defaults(func=cmd_bench)

    from minivllm.entrypoints import cli_serve, run_batch

    cli_serve.add_parsers(sub)
    run_batch.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except ValueError as e:
        print(f"minivllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
