"""`minivllm run-batch`: an OpenAI batch file through the engine, on one engine or several.

    minivllm run-batch -i requests.jsonl -o results.jsonl --model DIR [engine args]
        [--served-model-name NAME ...] [--data-parallel N [--ray-address ADDR | --no-ray]]

The file format and resuming are batch_file.py's; what one engine does with a line is
batch_runner.py's. This module is the driver: it reads the input lazily, answers the lines that
own no custom_id and skips those already in the output, hands the rest to the engines and
writes each result as it comes back, with a progress bar over the file's lines.

Where the engines run:
  * one engine (the default) in this process;
  * `--data-parallel N` (N > 1): N replicas through Ray Data (ray_data.py; a local Ray cluster,
    or the one at `--ray-address`), each an actor holding one engine on `tensor_parallel_size`
    GPUs;
  * `--no-ray [--data-parallel N]`: N engine processes on this host (N >= 1), each on its own
    `tensor_parallel_size` GPUs (or the CPU), through data_parallel.py, without Ray.
Imports of torch, the engine and Ray wait until the command runs.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RAY_MISSING = (
    '--data-parallel runs over Ray Data, which is not installed: pip install "minivllm[ray]" '
    "(or add --no-ray to run one engine process per GPU on this host)"
)


@dataclass
class BatchSummary:
    """What a run wrote (lines resumed from an earlier run are counted apart)."""

    num_lines: int | None  # non-blank lines in the input (None: not a regular file)
    num_resumed: int  # results already in the output file
    num_ok: int = 0
    num_failed: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    elapsed_s: float = 0.0  # the whole run, engine start-up included
    # From when the engines were up to the last result (None: not known, over Ray): the run
    # without the engines' start-up and shut-down.
    run_s: float | None = None


class _Job:
    """The output file, the progress bar and the counts of one run."""

    def __init__(self, input_path: str, output_path: str, use_tqdm: bool):
        from minivllm.entrypoints.batch_file import BatchOutput, count_lines
        from minivllm.progress import Progress

        self.output = BatchOutput(output_path)
        self.summary = BatchSummary(count_lines(input_path), self.output.num_resumed)
        self.progress = Progress(self.summary.num_lines, enabled=use_tqdm, desc="Batch lines")
        self.progress.step(0, 0, self.summary.num_resumed)
        self.count_tokens = True  # False when the engine's steps report them (on_step)
        self.ready_time: float | None = None
        self.last_write_time: float | None = None

    def ready(self) -> None:
        """The engines are up: the run's own time starts."""
        self.ready_time = time.perf_counter()

    def lines(self, input_path: str) -> Iterator[Any]:
        from minivllm.entrypoints.batch_file import pending_lines, read_lines

        return pending_lines(read_lines(input_path), self.output.done, self.write)

    def write(self, results: list[Any]) -> None:
        results = self.output.write(results)
        self.last_write_time = time.perf_counter()
        s = self.summary
        num_prompt = sum(r.num_prompt_tokens for r in results)
        num_output = sum(r.num_output_tokens for r in results)
        num_ok = sum(r.is_ok for r in results)
        s.num_ok += num_ok
        s.num_failed += len(results) - num_ok
        s.num_prompt_tokens += num_prompt
        s.num_output_tokens += num_output
        if self.count_tokens:
            self.progress.step(num_prompt, num_output, len(results))
        else:
            self.progress.step(0, 0, len(results))

    def on_step(self, num_prefill_tokens: int, num_output_tokens: int) -> None:
        self.progress.step(num_prefill_tokens, num_output_tokens, 0)

    def close(self) -> None:
        self.progress.close()
        self.output.close()


def run_batch(
    input_path: str,
    output_path: str,
    model: str,
    *,
    served_model_names: Sequence[str] | None = None,
    data_parallel_size: int = 1,
    use_ray: bool = True,
    ray_address: str | None = None,
    ray_batch_size: int | None = None,
    use_tqdm: bool = True,
    llm: Any = None,
    **engine_args: Any,
) -> BatchSummary:
    """Run a batch file into `output_path` (appending; a rerun resumes). See the module
    docstring for where the engines run; `engine_args` are LLM's. `llm`: an engine to use
    instead of building one (one engine in this process only; it stays open)."""
    if data_parallel_size < 1:
        raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
    if ray_batch_size is not None and ray_batch_size < 1:
        raise ValueError(f"ray_batch_size (--ray-batch-size) must be >= 1, got {ray_batch_size}")
    if llm is not None and (data_parallel_size > 1 or not use_ray or engine_args):
        raise ValueError(
            "llm= runs one engine in this process: no data parallelism, no engine_args"
        )
    is_ray = data_parallel_size > 1 and use_ray
    if is_ray:
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError:
            raise ValueError(RAY_MISSING) from None
    if not Path(input_path).is_file():
        what = "is not a file" if Path(input_path).exists() else "does not exist"
        raise ValueError(f"the input file {input_path!r} {what}")
    if Path(output_path).is_dir():
        raise ValueError(f"the output file {output_path!r} is a folder")
    if not Path(output_path).resolve().parent.is_dir():
        raise ValueError(
            f"the output file's folder {str(Path(output_path).parent)!r} does not exist"
        )
    if llm is None and not (is_ray and ray_address):  # a cluster may hold the model elsewhere
        from minivllm.config import EngineConfig

        EngineConfig.create(model, **engine_args)  # a bad argument fails here, before any output
    names = list(served_model_names or [model])
    start = time.perf_counter()
    job = _Job(input_path, output_path, use_tqdm)
    try:
        lines = job.lines(input_path)
        if data_parallel_size == 1 and use_ray:
            _run_one_engine(lines, job, model, names, engine_args, llm)
        elif use_ray:
            from minivllm.entrypoints.ray_data import run_over_ray

            run_over_ray(
                lines,
                job.write,
                model,
                names,
                data_parallel_size,
                engine_args,
                ray_address=ray_address,
                batch_size=ray_batch_size,
            )
        else:
            from minivllm.entrypoints.data_parallel import run_processes

            run_processes(
                lines, job.write, model, names, data_parallel_size, engine_args, job.ready
            )
    finally:
        job.close()
    end = time.perf_counter()
    job.summary.elapsed_s = end - start
    if job.ready_time is not None:
        job.summary.run_s = max(job.last_write_time or end, job.ready_time) - job.ready_time
    return job.summary


def _run_one_engine(
    lines: Iterator[Any],
    job: _Job,
    model: str,
    names: list[str],
    engine_args: dict[str, Any],
    llm: Any,
) -> None:
    from contextlib import nullcontext
    from itertools import islice

    from minivllm.entrypoints.batch_runner import BatchRunner
    from minivllm.llm import LLM

    def take(room: int, block: bool) -> list[Any] | None:
        return list(islice(lines, room)) or None  # reading a file never waits

    with nullcontext(llm) if llm is not None else LLM(model, **engine_args) as engine:
        job.count_tokens = False
        job.ready()
        BatchRunner(engine, names).run(take, job.write, job.on_step)


# ---- the command ------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Register `run-batch` on the `minivllm` command's subparsers."""
    from minivllm.cli_args import add_engine_args

    p = sub.add_parser("run-batch", help="run an OpenAI batch file (JSONL) through the engine")
    p.add_argument("-i", "--input-file", required=True, help="batch input file (JSONL)")
    p.add_argument(
        "-o",
        "--output-file",
        required=True,
        help="results file (JSONL); appended to, so a rerun skips the custom_ids it holds",
    )
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the model name(s) request bodies use (default: --model as given)",
    )
    p.add_argument("--no-progress", action="store_true")
    dp = p.add_argument_group("parallelism")
    dp.add_argument(
        "--data-parallel",
        type=int,
        default=1,
        metavar="N",
        help="N engine replicas (default 1): over Ray Data, or with --no-ray one process per "
        "GPU on this host",
    )
    dp.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="the Ray cluster to use (default: start a local one)",
    )
    dp.add_argument(
        "--no-ray",
        action="store_true",
        help="run the replicas as engine processes on this host (one per GPU) instead of over Ray",
    )
    dp.add_argument(
        "--ray-batch-size",
        type=int,
        default=None,
        metavar="ROWS",
        help="lines per Ray Data batch (default: 4 x max_num_seqs, fewer for small files)",
    )
    add_engine_args(p)
    p.set_defaults(func=cmd_run_batch)


def cmd_run_batch(args: argparse.Namespace) -> int:
    from minivllm.cli_args import engine_kwargs

    if args.no_ray and args.ray_address:
        raise ValueError("--ray-address and --no-ray exclude each other")
    engine_args = engine_kwargs(args)  # per replica: --tensor-parallel-size GPUs each
    s = run_batch(
        args.input_file,
        args.output_file,
        args.model,
        served_model_names=args.served_model_name,
        data_parallel_size=args.data_parallel,
        use_ray=not args.no_ray,
        ray_address=args.ray_address,
        ray_batch_size=args.ray_batch_size,
        use_tqdm=not args.no_progress,
        **engine_args,
    )
    resumed = f", {s.num_resumed} already in {args.output_file}" if s.num_resumed else ""
    rate = s.num_output_tokens / s.elapsed_s if s.elapsed_s > 0 else 0.0
    print(
        f"run-batch: {s.num_ok} succeeded, {s.num_failed} failed{resumed}; "
        f"{s.num_prompt_tokens} prompt + {s.num_output_tokens} output tokens in "
        f"{s.elapsed_s:.2f} s ({rate:,.0f} output tok/s) -> {args.output_file}"
    )
    return 0
