"""minivllm: a small, fast offline LLM inference engine for Qwen3 checkpoints (vLLM's API).

The public names are imported on first use, so `import minivllm` (and the `minivllm` command's
`--help`) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "LLM": "minivllm.llm",
    "LLMEngine": "minivllm.compat",
    "CompletionOutput": "minivllm.outputs",
    "Logprob": "minivllm.outputs",
    "EngineConfig": "minivllm.config",
    "ModelConfig": "minivllm.model_config",
    "RequestMetrics": "minivllm.outputs",
    "RequestOutput": "minivllm.outputs",
    "SamplingParams": "minivllm.sampling_params",
}

__all__ = [
    "LLM",
    "CompletionOutput",
    "Logprob",
    "EngineConfig",
    "LLMEngine",
    "ModelConfig",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]

if TYPE_CHECKING:
    from minivllm.compat import LLMEngine
    from minivllm.config import EngineConfig
    from minivllm.model_config import ModelConfig
    from minivllm.llm import LLM
    from minivllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
    from minivllm.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'minivllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
