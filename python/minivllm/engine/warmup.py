"""Warm-up steps, planned by a throwaway scheduler on a pool of their own.

Two uses at start-up on a GPU: the largest step the engine can take (max_num_batched_tokens of
prompt over up to max_num_seqs sequences, every sampling filter on) measures the activation memory
the KV pool must leave free; then a short prefill step and a full mixed step (decodes beside long
prefill chunks) compile the kernel variants the first requests would otherwise wait for, the
LM head runs once at every sampled-row count (`warm_up_lm_head`), and two short prompts take the
CUDA-graph path of a request's steps (`warm_up_graph_steps`). Every
tensor-parallel rank plans and runs the same steps itself, so the collectives line up. The steps
go through the same staging buffer as real ones and write K/V only into blocks the real scheduler
has not handed out yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from minivllm.config import EngineConfig
from minivllm.engine import new_scheduler
from minivllm.engine.staging import schedule_into

if TYPE_CHECKING:
    from minivllm.engine.model_runner import ModelRunner


def _blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def largest_step_scheduler(config: EngineConfig) -> tuple[Any, int]:
    """A scheduler holding exactly one largest step, and the pool size it plans for."""
    wanted = config.max_num_batched_tokens
    seq_len = min(-(-wanted // config.max_num_seqs), config.max_model_len - 1)
    num_seqs = min(config.max_num_seqs, -(-wanted // seq_len))
    num_tokens = min(wanted, num_seqs * seq_len)
    lens = [seq_len] * (num_seqs - 1) + [num_tokens - seq_len * (num_seqs - 1)]
    num_blocks = num_seqs * _blocks(seq_len, config.block_size)
    sched = new_scheduler(config, num_blocks, enable_prefix_caching=False, async_scheduling=False)
    for i, n in enumerate(lens):
        sched.add_request(i, [0] * n, 1, temperature=1.0, top_p=0.9, top_k=50, min_p=0.05)
    return sched, num_blocks


def run_steps(
    runner: ModelRunner, scheduler: Any, max_steps: int | None = None, graphs: bool = False
) -> None:
    """Run the scheduler's steps on this rank until it is done (or max_steps): eagerly, or with
    `graphs` through `launch` as a request's steps go (one GPU)."""
    steps = 0
    while scheduler.has_unfinished() and (max_steps is None or steps < max_steps):
        batch = schedule_into(scheduler, runner.staging)
        if batch is None:
            raise RuntimeError("a warm-up scheduler has requests but scheduled none")
        tokens = runner.launch(batch).result() if graphs else runner.run_eagerly(batch)
        if runner.tp.rank != 0:  # rank 0 holds the ids (workers sample with async scheduling only)
            tokens = np.zeros(batch.num_samples, dtype=np.int64)
        scheduler.update(tokens)
        steps += 1


def warm_up_step_kinds(runner: ModelRunner) -> None:
    """A short prefill step, then a full mixed step: decodes (sampling and greedy rows, an odd
    count so rows are unaligned) beside long prefill chunks filling max_num_batched_tokens."""
    config = runner.config
    bs, num_blocks = config.block_size, runner.kv_cache_info.num_blocks
    budget, max_len = config.max_num_batched_tokens, config.max_model_len - 2
    num_short = min(config.max_num_seqs, 5)
    short = [1 + (7 * i + 5) % max(1, min(60, max_len)) for i in range(num_short)]
    # Long rows fit the pool beside the short ones (a pool may hold one sequence only).
    room = (num_blocks - sum(_blocks(n + 2, bs) for n in short)) * bs - 2
    long_len = max(1, min(1024, max_len, room))
    num_long = min(config.max_num_seqs - num_short, -(-(budget - num_short) // long_len))
    lens = short + [long_len] * max(0, num_long)
    pool = min(sum(_blocks(n + 2, bs) for n in lens), num_blocks)
    sched = new_scheduler(config, pool, enable_prefix_caching=False, async_scheduling=False)
    for i, n in enumerate(lens):
        if i == num_short:  # the short ones prefill, then decode beside the long ones
            run_steps(runner, sched, max_steps=1)
        sched.add_request(i, [0] * n, 2, temperature=0.7 if i % 2 else 0.0, seed=i)
    # Eagerly, even where a mixed CUDA graph would run it: the engine launches steps with
    # prefill eagerly past its largest graph (and every step without graphs), and their kernel
    # variants compile here.
    run_steps(runner, sched, max_steps=1)


def warm_up_lm_head(runner: ModelRunner) -> None:
    """The LM head once at every sampled-row count a step can have (1 .. max_num_seqs). cuBLAS
    picks a kernel per shape, and under CUDA's lazy module loading a kernel's first launch
    waits for the whole device: in a step it would block the host until the GPU has run the
    step, when it should be planning the next one (steps with prefill sample an ever new
    number of rows)."""
    hidden_size = runner.config.model_config.hidden_size
    hidden = torch.zeros(
        runner.config.max_num_seqs, hidden_size, dtype=runner.dtype, device=runner.device
    )
    with torch.inference_mode():
        for rows in range(1, hidden.shape[0] + 1):
            runner.model.compute_logits(hidden[:rows])


def warm_up_graph_steps(runner: ModelRunner) -> None:
    """Two lone three-token prompts, one greedy and one sampled, each through `launch` as a
    request's steps go: the smallest mixed graph with its one sampled row gathered, the LM
    head, the sampler and the read-back, then the one-row decode graph. Without it the engine's
    first request paid ~15 ms more than the next one (H100; not with CUDA's lazy module loading
    off): a kernel of this path that the eager warm-up steps do not launch."""
    if runner.graph_runner is None:
        return
    config = runner.config
    pool = min(_blocks(5, config.block_size), runner.kv_cache_info.num_blocks)
    sched = new_scheduler(config, pool, enable_prefix_caching=False, async_scheduling=False)
    for i, temperature in enumerate((0.0, 0.7)):
        sched.add_request(i, [0] * 3, 2, temperature=temperature, seed=i)
        run_steps(runner, sched, graphs=True)
