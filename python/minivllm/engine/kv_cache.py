"""The paged KV cache: how many blocks fit, and the pool itself.

One tensor holds every layer's K and V, `[2, layers, num_blocks, block_size, kv_heads, head_dim]`;
each attention layer gets its two slices. On a GPU the pool gets what `gpu_memory_utilization`
leaves after the weights and the activations of the largest step, measured by running that step
once with a throwaway cache; on the CPU it is capped at CPU_KV_CACHE_BYTES.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from minivllm.engine import warmup

if TYPE_CHECKING:
    from minivllm.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# KV pool size on the CPU when num_kv_blocks is not given (there is no free-memory probe there).
CPU_KV_CACHE_BYTES = 256 << 20


@dataclass(frozen=True)
class KVCacheInfo:
    """What start-up measured: the pool's size (kept out of EngineConfig on purpose)."""

    num_blocks: int
    block_size: int
    bytes_per_block: int  # all layers, K and V, this rank's KV heads

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def cache_shape(runner: ModelRunner, num_blocks: int) -> tuple[int, ...]:
    mc = runner.config.model_config
    return (2, mc.num_hidden_layers, num_blocks, runner.config.block_size,
            runner.num_kv_heads, mc.head_dim)  # fmt: skip


def bytes_per_block(runner: ModelRunner) -> int:
    shape = cache_shape(runner, 1)
    elem = torch.tensor([], dtype=runner.dtype).element_size()
    return elem * int(torch.Size(shape).numel())


def attach(runner: ModelRunner, cache: torch.Tensor) -> None:
    """Point every attention layer at its K and V slices of `cache`."""
    for i, attn in enumerate(runner.model.attention_layers()):
        attn.k_cache, attn.v_cache = cache[0, i], cache[1, i]


def allocate(runner: ModelRunner) -> tuple[torch.Tensor, KVCacheInfo]:
    """Size the pool (every rank affords the same block ids), allocate it and attach it."""
    config = runner.config
    per_block = bytes_per_block(runner)
    needed = config.max_blocks_per_seq  # one max_model_len sequence
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    elif runner.device.type == "cuda":
        num_blocks = _profile_num_blocks(runner, per_block)
    else:
        wanted = config.max_num_seqs * needed
        num_blocks = max(needed, min(wanted, CPU_KV_CACHE_BYTES // per_block))
    num_blocks = runner.tp.min_int(num_blocks, runner.device)
    if num_blocks < needed:
        raise ValueError(
            f"the KV cache holds {num_blocks} blocks of {config.block_size} tokens "
            f"({num_blocks * config.block_size} tokens), less than one max_model_len="
            f"{config.max_model_len} sequence needs ({needed} blocks); raise num_kv_blocks or "
            "gpu_memory_utilization, or lower max_model_len"
        )
    cache = torch.zeros(cache_shape(runner, num_blocks), dtype=runner.dtype, device=runner.device)
    attach(runner, cache)
    return cache, KVCacheInfo(num_blocks, config.block_size, per_block)


def detach(runner: ModelRunner) -> None:
    for attn in runner.model.attention_layers():
        attn.k_cache = attn.v_cache = torch.empty(0, device=runner.device)


def _profile_num_blocks(runner: ModelRunner, per_block: int) -> int:
    """Run the largest step (max_num_batched_tokens of prefill, max_num_seqs sampled rows with
    every sampling filter) with a throwaway cache, then give the pool what
    gpu_memory_utilization leaves."""
    config, device = runner.config, runner.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    used_before = total - free
    allocated_before = torch.cuda.memory_allocated(device)
    scheduler, num_tmp_blocks = warmup.largest_step_scheduler(config)
    tmp = torch.zeros(cache_shape(runner, num_tmp_blocks), dtype=runner.dtype, device=device)
    attach(runner, tmp)
    # Every rank runs the same step itself, so the collectives line up.
    warmup.run_steps(runner, scheduler)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - allocated_before
    activations = max(0, peak - tmp.numel() * tmp.element_size())  # the throwaway cache aside
    del tmp
    detach(runner)
    torch.cuda.empty_cache()
    budget = total * config.gpu_memory_utilization - used_before - peak
    if runner.graphs_planned:
        # The mixed-step CUDA graph's pool keeps a full step's activations for good, beside what
        # an eager step allocates.
        budget -= activations
    logger.info(
        "memory: %.2f GiB in use before the pool (weights and others), warm-up peak %.2f GiB, "
        "pool budget %.2f GiB",
        used_before / 2**30,
        peak / 2**30,
        max(budget, 0) / 2**30,
    )
    return max(int(budget // per_block), 0)
