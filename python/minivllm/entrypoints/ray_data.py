"""minivllm on Ray Data: one engine per actor, `Dataset.map_batches` spreading rows over them.

    import ray
    from minivllm import SamplingParams
    from minivllm.entrypoints.ray_data import build_ray_processor

    ds = ray.data.from_items([{"prompt": "Hello"}, {"messages": [...]} ...])
    process = build_ray_processor("path/to/model", data_parallel_size=4,
                                  sampling_params=SamplingParams(max_tokens=64))
    for row in process(ds).iter_rows():
        print(row["generated_text"])

`LLMPredictor` is the callable class `map_batches` instantiates once per actor: it loads the
model once, then runs each batch of rows on its engine. `BatchLinePredictor` does the same
for the lines of an OpenAI batch file (what `minivllm run-batch --data-parallel N` runs).
Each actor asks for `tensor_parallel_size` GPUs (none on the CPU); `data_parallel_size` actors
run at once. Batches default to 4 x max_num_seqs rows: an engine runs a batch to its end
before it takes the next, so a batch several times the running set keeps the set full for most
of its run (the drained tail is a small part of it).

Faults: Ray Data restarts an actor whose process died and retries the batch it was running (its
defaults for an actor pool: max_restarts and max_task_retries of -1, as of Ray 2.60 where this is
tested), so a dead replica costs only its batch in flight; a batch returns its results only once
it has finished, so none are written twice.

This module imports Ray only inside the functions that need it: the predictors also work
without Ray (called on a batch dict directly).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np

from minivllm.entrypoints.batch_file import InputLine, Result, key_of
from minivllm.entrypoints.batch_runner import Put
from minivllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

BATCH_SIZE_PER_SEQ = 4  # default rows per batch, in multiples of max_num_seqs


def _default_max_num_seqs() -> int:
    from minivllm.config import EngineConfig

    return int(EngineConfig.__dataclass_fields__["max_num_seqs"].default)


class _Replica:
    """One LLM per actor, built once."""

    def __init__(self, model: str, engine_args: dict[str, Any]):
        from minivllm.llm import LLM

        self.llm = LLM(model, **engine_args)


class LLMPredictor(_Replica):
    """Rows with `prompt` (text or token ids) or `messages` (a chat, through the checkpoint's
    chat template) gain `generated_text`, `finish_reason`, `num_prompt_tokens`,
    `num_generated_tokens` and `error` (None, or why the row's prompt was refused: the rest of
    the batch goes on). Every row samples with `sampling_params` (its first completion)."""

    def __init__(
        self,
        model: str,
        sampling_params: SamplingParams | dict[str, Any] | None = None,
        **engine_args: Any,
    ):
        super().__init__(model, engine_args)
        if isinstance(sampling_params, dict):
            sampling_params = SamplingParams(**sampling_params)
        self.sampling_params = sampling_params or SamplingParams()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        num_rows = len(next(iter(batch.values()))) if batch else 0
        errors: list[str | None] = [None] * num_rows
        texts: list[str | None] = [None] * num_rows
        reasons: list[str | None] = [None] * num_rows
        num_prompt, num_generated = [0] * num_rows, [0] * num_rows

        def items() -> Iterator[tuple[int, Any, SamplingParams]]:
            for i in range(num_rows):
                try:
                    yield i, self._prompt(batch, i), self.sampling_params
                except ValueError as e:
                    errors[i] = str(e)

        for i, out in self.llm.stream(items()):
            if isinstance(out, ValueError):
                errors[i] = str(out)
                continue
            first = out.outputs[0]
            texts[i], reasons[i] = first.text, first.finish_reason
            num_prompt[i], num_generated[i] = len(out.prompt_token_ids), len(first.token_ids)
        return {
            **batch,
            "generated_text": np.array(texts, dtype=object),
            "finish_reason": np.array(reasons, dtype=object),
            "num_prompt_tokens": np.array(num_prompt, dtype=np.int64),
            "num_generated_tokens": np.array(num_generated, dtype=np.int64),
            "error": np.array(errors, dtype=object),
        }

    def _prompt(self, batch: dict[str, np.ndarray], i: int) -> Any:
        if "messages" in batch and batch["messages"][i] is not None:
            messages = [dict(m) for m in batch["messages"][i]]
            return self.llm.inputs.chat_prompt(messages)
        if "prompt" not in batch:
            raise ValueError("a row needs a 'prompt' or 'messages' column")
        prompt = batch["prompt"][i]
        return prompt.tolist() if isinstance(prompt, np.ndarray) else prompt


class BatchLinePredictor(_Replica):
    """Rows `{"line": its number, "text": a line of an OpenAI batch file}` become
    `{"line", "output": the result line, "is_ok", "num_prompt_tokens", "num_output_tokens"}`
    (batch_file.py's format; batch_runner.py answers them)."""

    def __init__(
        self, model: str, served_model_names: Sequence[str] | None = None, **engine_args: Any
    ):
        from minivllm.entrypoints.batch_runner import BatchRunner

        super().__init__(model, engine_args)
        self.runner = BatchRunner(self.llm, served_model_names)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lines = [InputLine(int(n), str(t)) for n, t in zip(batch["line"], batch["text"])]
        results: list[Result] = []

        def take(room: int, block: bool) -> list[InputLine] | None:
            if not lines:
                return None
            chunk = lines[:room]
            del lines[:room]
            return chunk

        self.runner.run(take, results.extend)
        return {
            "line": np.array([r.number for r in results], dtype=np.int64),
            "output": np.array([r.text for r in results], dtype=object),
            "is_ok": np.array([r.is_ok for r in results], dtype=bool),
            "num_prompt_tokens": np.array([r.num_prompt_tokens for r in results], dtype=np.int64),
            "num_output_tokens": np.array([r.num_output_tokens for r in results], dtype=np.int64),
        }


def map_batches_args(
    data_parallel_size: int,
    engine_args: dict[str, Any],
    batch_size: int | None = None,
    use_gpus: bool = True,
) -> dict[str, Any]:
    """`Dataset.map_batches` arguments for `data_parallel_size` replicas of an engine (fault
    handling is Ray Data's own: see the module docstring)."""
    import ray.data

    if data_parallel_size < 1:
        raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
    if batch_size is None:
        batch_size = default_batch_size(engine_args)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tp = int(engine_args.get("tensor_parallel_size", 1))
    return {
        "batch_size": batch_size,
        "compute": ray.data.ActorPoolStrategy(size=data_parallel_size),
        "num_gpus": tp if use_gpus else 0,
        "num_cpus": 1,
    }


def default_batch_size(engine_args: dict[str, Any]) -> int:
    max_num_seqs = engine_args.get("max_num_seqs") or _default_max_num_seqs()
    return BATCH_SIZE_PER_SEQ * int(max_num_seqs)


def _uses_gpus(engine_args: dict[str, Any]) -> bool:
    """Whether replicas need GPUs: a CUDA device asked for, or none asked and the cluster has
    GPUs (ray must be initialized)."""
    import ray

    device = engine_args.get("device")
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    if device is None:
        return has_gpus
    if str(device).startswith("cuda"):
        if not has_gpus:
            raise ValueError(f"device={device!r} but the Ray cluster has no GPUs")
        return True
    return False


def build_ray_processor(
    model: str,
    *,
    data_parallel_size: int = 1,
    batch_size: int | None = None,
    sampling_params: SamplingParams | dict[str, Any] | None = None,
    **engine_args: Any,
) -> Callable[[ray.data.Dataset], ray.data.Dataset]:
    """A function that maps a Dataset of prompt rows through `data_parallel_size` replicas of
    `LLMPredictor` (see the module docstring). Ray must be initialized."""
    kwargs = map_batches_args(data_parallel_size, engine_args, batch_size, _uses_gpus(engine_args))
    constructor = {"model": model, "sampling_params": sampling_params, **engine_args}

    def process(ds: ray.data.Dataset) -> ray.data.Dataset:
        return ds.map_batches(LLMPredictor, fn_constructor_kwargs=constructor, **kwargs)

    return process


def run_over_ray(
    lines: Iterator[InputLine],
    write: Put,
    model: str,
    served_model_names: Sequence[str],
    data_parallel_size: int,
    engine_args: dict[str, Any],
    ray_address: str | None = None,
    batch_size: int | None = None,
) -> None:
    """run-batch's Ray path: the pending lines go into Ray's object store, one batch per
    block (the driver holds a batch per replica at most; the store spills to disk), before the
    replicas start; they run through `BatchLinePredictor` and each finished batch's results are
    written as they come back."""
    import pyarrow as pa
    import ray
    import ray.data

    size = batch_size or default_batch_size(engine_args)
    # A file shorter than a batch per replica is cut into one batch per replica instead.
    head = list(islice(lines, size * data_parallel_size))
    if not head:
        return
    if batch_size is None and len(head) < size * data_parallel_size:
        size = math.ceil(len(head) / data_parallel_size)
    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address, include_dashboard=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts lines
        refs = [ray.put(_table(pa, head[i : i + size])) for i in range(0, len(head), size)]
        del head
        while chunk := list(islice(lines, size)):
            refs.append(ray.put(_table(pa, chunk)))
        kwargs = map_batches_args(data_parallel_size, engine_args, size, _uses_gpus(engine_args))
        constructor = {"model": model, "served_model_names": list(served_model_names)}
        ds = ray.data.from_arrow_refs(refs).map_batches(
            BatchLinePredictor, fn_constructor_kwargs={**constructor, **engine_args}, **kwargs
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            write(_results(batch))
    finally:
        if started:
            ray.shutdown()


def _table(pa: Any, lines: list[InputLine]) -> Any:
    return pa.table(
        {
            "line": pa.array([x.number for x in lines], pa.int64()),
            "text": pa.array([x.text for x in lines], pa.string()),
        }
    )


def _results(batch: dict[str, np.ndarray]) -> list[Result]:
    return [
        Result(int(n), key_of(json.loads(text)), str(text), bool(ok), int(p), int(o))
        for n, text, ok, p, o in zip(
            batch["line"],
            batch["output"],
            batch["is_ok"],
            batch["num_prompt_tokens"],
            batch["num_output_tokens"],
        )
    ]
