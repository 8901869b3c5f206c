"""minivllm: a small, fast offline LLM inference engine for Qwen3 checkpoints (vLLM's API)."""

from __future__ import annotations

from minivllm.compat import LLMEngine
from minivllm.config import EngineConfig, ModelConfig
from minivllm.llm import LLM
from minivllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from minivllm.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "LLMEngine",
    "CompletionOutput",
    "Logprob",
    "EngineConfig",
    "ModelConfig",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]
