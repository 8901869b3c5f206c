"""The command line's shared arguments: engine arguments and sampling flags, and how they
become `LLM(...)` keyword arguments and a SamplingParams (every sub-command uses them)."""

from __future__ import annotations

import argparse
from typing import Any


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--enforce-eager", action="store_true")
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="plan the next step while one runs (default: on with one CUDA GPU)",
    )
    g.add_argument(
        "-tp",
        "--tensor-parallel-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="split the model over N GPUs of this host (N processes)",
    )
    g.add_argument("--scheduler", default=None, choices=["cpp", "python"])
    g.add_argument("--attention-backend", default=None, choices=["torch", "triton"])
    g.add_argument("--load-format", default=None, choices=["auto", "dummy"])
    g.add_argument("--seed", type=int, default=None)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": args.dtype, "device": args.device}
    for name in (
        "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "num_kv_blocks",
        "gpu_memory_utilization", "scheduler", "attention_backend", "load_format", "seed",
        "async_scheduling", "tensor_parallel_size",
    ):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    if args.no_prefix_caching:
        kwargs["enable_prefix_caching"] = False
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    return kwargs


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=positive_int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace) -> Any:
    from minivllm import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_tokens=args.max_tokens,
        seed=args.sample_seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
