"""Engine arguments (EngineConfig), validated; the model's architecture is model_config.py's.

EngineConfig is frozen and validated when built. Values measured at start-up (the number of KV
blocks, the eos ids) live in `engine.RuntimeInfo`, never here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minivllm.limits import INT32_MAX, SEED_LIMIT
from minivllm.model_config import ModelConfig, parse_dtype

logger = logging.getLogger(__name__)

# max_model_len when neither the user nor a small checkpoint limit says otherwise.
DEFAULT_MAX_MODEL_LEN = 4096


@dataclass(frozen=True)
class EngineConfig:
    """Every engine argument of `LLM(...)`, validated. Build it with `EngineConfig.create`."""

    model: str
    model_config: ModelConfig
    tokenizer: str | None = None  # tokenizer folder; default: the model folder
    dtype: str = "auto"
    device: str | None = None  # None: cuda if available, else cpu
    max_model_len: int | None = None  # None: the checkpoint's limit, capped at 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from memory at start-up
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    # Plan step N+1 while step N runs on the GPU (None: on for CUDA with one GPU, off otherwise;
    # with tensor_parallel_size > 1 it has been tested on gloo (CPU) only, so it is asked for).
    async_scheduling: bool | None = None
    tensor_parallel_size: int = 1
    # With tensor parallelism: a step that has not finished after this long raises WorkerError
    # naming the worker that holds it up (start-up waits longer: STARTUP_TIMEOUT_S).
    tp_step_timeout_s: float = 120.0
    scheduler: str = "cpp"
    attention_backend: str | None = None  # None: triton on CUDA, torch on CPU
    load_format: str = "auto"
    seed: int = 0
    # Load a checkpoint with tensors the model has no parameter for (by default an error: such a
    # checkpoint usually does not match its config.json, e.g. more layers than num_hidden_layers).
    allow_unused_weights: bool = False

    @classmethod
    def create(cls, model: str | os.PathLike[str], **engine_args: Any) -> EngineConfig:
        """Read `model`/config.json and validate engine_args (unknown argument: ValueError)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"model", "model_config"}
        for name in engine_args:
            if name not in known:
                raise ValueError(
                    f"unknown engine argument {name!r}; known: {', '.join(sorted(known))}"
                )
        if not isinstance(model, (str, os.PathLike)):
            raise ValueError(
                f"model must be the path of a local Hugging Face checkpoint folder, got "
                f"{model!r}; for example LLM('path/to/Qwen3-0.6B')"
            )
        model = os.fspath(model)
        return cls(model=model, model_config=ModelConfig.from_model_dir(model), **engine_args)

    def __post_init__(self) -> None:
        mc = self.model_config
        if self.tokenizer is not None:
            if not isinstance(self.tokenizer, (str, os.PathLike)):
                raise ValueError(f"tokenizer must be a folder path, got {self.tokenizer!r}")
            object.__setattr__(self, "tokenizer", os.fspath(self.tokenizer))
            if not Path(self.tokenizer).is_dir():
                raise ValueError(
                    f"tokenizer={self.tokenizer!r} is not a folder (it does not exist); give a "
                    "local folder with the tokenizer's files (tokenizer.json, "
                    "tokenizer_config.json), or leave tokenizer out to use the model folder's"
                )
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device {self.device!r} is not a torch device") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} requested, but CUDA is not available")
            if dev.type not in ("cpu", "cuda"):
                raise ValueError(f"device {self.device!r}: minivllm runs on cpu or cuda")
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_int("block_size", self.block_size, 1)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_num_seqs="
                f"{self.max_num_seqs} (every running sequence's decode must fit in one step)"
            )
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        self._check_tensor_parallel()
        t = self.tp_step_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(f"tp_step_timeout_s must be a positive number of seconds, got {t!r}")
        _check_int("seed", self.seed, 0, SEED_LIMIT - 1)
        if self.num_kv_blocks is not None:
            _check_int("num_kv_blocks", self.num_kv_blocks, 1)
            if self.num_kv_blocks * self.block_size > INT32_MAX:
                raise ValueError(
                    f"num_kv_blocks * block_size = {self.num_kv_blocks} * {self.block_size} "
                    "cache slots do not fit the core's int32 slot ids"
                )
        if self.max_model_len is None:
            # Resolving the default here keeps a single source of truth for the limit.
            object.__setattr__(
                self, "max_model_len", min(mc.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
            )
        _check_int("max_model_len", self.max_model_len, 2)
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the checkpoint's "
                f"max_position_embeddings={mc.max_position_embeddings}"
            )
        if (
            isinstance(self.gpu_memory_utilization, bool)
            or not isinstance(self.gpu_memory_utilization, (int, float))
            or not 0.0 < self.gpu_memory_utilization <= 1.0
        ):
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.scheduler not in ("cpp", "python"):
            raise ValueError(f"scheduler must be 'cpp' or 'python', got {self.scheduler!r}")
        if self.attention_backend not in (None, "torch", "triton"):
            raise ValueError(
                f"attention_backend must be 'torch', 'triton' or None, got "
                f"{self.attention_backend!r}"
            )
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        self._check_block_size()
        if (
            self.attention_backend == "triton"
            and self.torch_device.type == "cpu"
            and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes")
        ):
            raise ValueError(
                "attention_backend='triton' needs a CUDA GPU (on the CPU its kernels run only "
                "under the Triton interpreter, TRITON_INTERPRET=1, which the tests use); on "
                "the CPU use attention_backend='torch', the default there"
            )
        for name in ("enable_prefix_caching", "enforce_eager", "allow_unused_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.async_scheduling is None:
            object.__setattr__(
                self,
                "async_scheduling",
                self.torch_device.type == "cuda" and self.tensor_parallel_size == 1,
            )
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be a bool, got {self.async_scheduling!r}")

    def _check_block_size(self) -> None:
        """The Triton kernels walk the cache in key tiles of a power-of-two size, which must
        divide a block or be divided by it: a power-of-two block_size. The torch backend takes
        any size."""
        bs = self.block_size
        if self.attention_backend_name == "triton" and bs & (bs - 1):
            raise ValueError(
                f"block_size={bs}: the triton attention backend needs a power of two (1, 2, 4, "
                "..., 16, 32, ...); the torch backend takes any block size"
            )

    def _check_tensor_parallel(self) -> None:
        """Every rank holds whole heads and an equal slice of the MLP (the vocabulary is
        padded instead); on CUDA rank i runs on cuda:i, so there must be that many GPUs."""
        n, mc = self.tensor_parallel_size, self.model_config
        if n == 1:
            return
        if self.torch_device.type == "cuda":
            if self.device is not None and torch.device(self.device).index not in (None, 0):
                raise ValueError(
                    f"device={self.device!r} with tensor_parallel_size={n}: rank i runs on "
                    "cuda:i, so pass device='cuda'"
                )
            available = torch.cuda.device_count()
            if n > available:
                raise ValueError(
                    f"tensor_parallel_size={n} needs {n} GPUs, but only {available} are visible"
                )
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = getattr(mc, name)
            if value % n:
                raise ValueError(
                    f"tensor_parallel_size={n} must divide the checkpoint's {name}={value}"
                )

    def rank_device(self, rank: int) -> torch.device:
        """Where tensor-parallel rank `rank` runs: cuda:rank on GPUs (one GPU: torch_device),
        the CPU on the CPU."""
        device = self.torch_device
        if device.type == "cuda" and self.tensor_parallel_size > 1:
            return torch.device("cuda", rank)
        return device

    @property
    def torch_device(self) -> torch.device:
        device = torch.device(
            self.device
            if self.device is not None
            else "cuda"
            if torch.cuda.is_available()
            else "cpu"
        )
        if device.type == "cuda" and device.index is None:
            # A bare "cuda" means the current GPU; give it an index so set_device and
            # mem_get_info accept it.
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    @property
    def torch_dtype(self) -> torch.dtype:
        """'auto' is the checkpoint's dtype."""
        return self.model_config.dtype if self.dtype == "auto" else parse_dtype(self.dtype)

    @property
    def attention_backend_name(self) -> str:
        if self.attention_backend is not None:
            return self.attention_backend
        return "triton" if self.torch_device.type == "cuda" else "torch"

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer if self.tokenizer is not None else self.model


def _check_int(name: str, value: Any, minimum: int, maximum: int = INT32_MAX) -> None:
    """An int in [minimum, maximum]; the default maximum is what the core's int32 fields hold."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
