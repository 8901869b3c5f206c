"""The engine's moving parts: scheduler selection and what start-up measured.

`new_scheduler` makes the C++ core (`minivllm._core.Scheduler`, scheduler="cpp") or its
pure-Python twin (`minivllm.engine.reference.Scheduler`, scheduler="python"); both follow
docs/interfaces.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from minivllm.config import EngineConfig


@dataclass(frozen=True)
class RuntimeInfo:
    """Values found at start-up rather than configured."""

    num_kv_blocks: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int


def scheduler_class(name: str) -> Any:
    if name == "cpp":
        module = importlib.import_module("minivllm._core")
        if not hasattr(module, "Scheduler"):
            raise ImportError("minivllm._core was built without a Scheduler; rebuild the package")
        return module.Scheduler
    if name == "python":
        return importlib.import_module("minivllm.engine.reference").Scheduler
    raise ValueError(f"scheduler must be 'cpp' or 'python', got {name!r}")


def new_scheduler(
    config: EngineConfig,
    num_kv_blocks: int,
    enable_prefix_caching: bool | None = None,
    async_scheduling: bool | None = None,
) -> Any:
    """The configured scheduler over a pool of num_kv_blocks (the flags default to config's)."""
    cls = scheduler_class(config.scheduler)
    return cls(
        num_kv_blocks,
        config.block_size,
        config.max_num_seqs,
        config.max_num_batched_tokens,
        config.max_model_len,
        config.enable_prefix_caching if enable_prefix_caching is None else enable_prefix_caching,
        config.async_scheduling if async_scheduling is None else async_scheduling,
    )
