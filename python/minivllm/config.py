"""Engine arguments (EngineConfig) and the model architecture read from config.json (ModelConfig).

Both are frozen and validated when built. Values measured at start-up (the number of KV blocks, the
eos ids) live in `engine.model_runner.RuntimeInfo`, never here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Architectures minivllm can run, and whether their attention has a q/k RMSNorm and a qkv bias.
SUPPORTED_ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2"}

# What the C++ core's fields hold: token ids, positions, slots and lengths are int32, max_tokens
# and sequence ids int64.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
# Seeds (the engine's, a request's) are unsigned 64-bit, as torch generators and the core take them.
SEED_LIMIT = 2**64

# max_model_len when neither the user nor a small checkpoint limit says otherwise.
DEFAULT_MAX_MODEL_LEN = 4096

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a torch.dtype) -> torch.dtype, else ValueError."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {name}; use float32, float16 or bfloat16")
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use auto, float32, float16 or bfloat16")
    return _DTYPES[key]


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Qwen3 (or Qwen2) checkpoint, read from its config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v (and o for Qwen3, whose flag covers all four)
    mlp_bias: bool = False  # not in Qwen checkpoints; MinivLLM's ffn_bias
    dtype: torch.dtype = torch.bfloat16
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"config.json: head_dim={self.head_dim} must be even for rotary")

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def has_qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def has_qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def has_o_bias(self) -> bool:
        return self.model_type == "qwen3" and self.attention_bias

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config.json") -> ModelConfig:
        """Read a parsed config.json; any key of the wrong type or value is a ValueError naming
        `source` and the key."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        get = _ConfigReader(raw, source)
        architectures = raw.get("architectures") or []
        if not isinstance(architectures, list):
            raise ValueError(f"{source}: architectures must be a list, got {architectures!r}")
        arch = architectures[0] if architectures else None
        if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(SUPPORTED_ARCHITECTURES)
            raise ValueError(
                f"{source}: architecture {arch!r} is not supported; minivllm runs {supported}"
            )
        # transformers 5 writes rope_parameters, older versions rope_scaling; either may
        # carry rope_theta, and neither may ask for scaled rotary embeddings.
        rope_theta = raw.get("rope_theta")
        for key in ("rope_parameters", "rope_scaling"):
            rope = raw.get(key)
            if rope is None:
                continue
            if not isinstance(rope, dict):
                raise ValueError(f"{source}: {key} must be an object, got {rope!r}")
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", None):
                raise ValueError(
                    f"{source}: rope type {rope_type!r} is not supported (only default)"
                )
            if rope_theta is None:
                rope_theta = rope.get("rope_theta")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"{source}: hidden_act {raw['hidden_act']!r} is not supported (Qwen uses silu)"
            )
        if get.flag("use_sliding_window", False):
            raise ValueError(f"{source}: sliding-window attention is not supported")
        hidden = get.integer("hidden_size")
        heads = get.integer("num_attention_heads")
        if raw.get("head_dim") is not None:
            head_dim = get.integer("head_dim")
        elif hidden % heads:
            raise ValueError(
                f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads="
                f"{heads} and there is no head_dim"
            )
        else:
            head_dim = hidden // heads
        eos = raw.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        for i in eos_ids:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"{source}: eos_token_id must hold token ids, got {eos!r}")
        dtype_name = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
        try:
            dtype = parse_dtype(dtype_name)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        return cls(
            architecture=arch,
            vocab_size=get.integer("vocab_size", maximum=INT32_MAX),
            hidden_size=hidden,
            intermediate_size=get.integer("intermediate_size"),
            num_hidden_layers=get.integer("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=get.integer("num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=get.number("rms_norm_eps", 1e-6),
            rope_theta=get.number("rope_theta", 10000.0 if rope_theta is None else rope_theta),
            max_position_embeddings=get.integer("max_position_embeddings", 32768),
            tie_word_embeddings=get.flag("tie_word_embeddings", False),
            attention_bias=get.flag("attention_bias", False),
            mlp_bias=get.flag("mlp_bias", False),
            dtype=dtype,
            eos_token_ids=tuple(eos_ids),
        )

    @classmethod
    def from_model_dir(cls, model: str | os.PathLike[str]) -> ModelConfig:
        path = Path(model)
        if not path.is_dir():
            raise ValueError(
                f"model folder {str(model)!r} does not exist (minivllm loads local "
                "Hugging Face checkpoint folders only)"
            )
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} has no config.json; is it a Hugging Face model folder?")
        try:
            raw = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from None
        return cls.from_dict(raw, source=str(config_file))


_MISSING: Any = object()


class _ConfigReader:
    """Typed reads of config.json keys: a missing key without a default, or a value of the
    wrong type, is a ValueError naming the file and the key (JSON null means "use the default")."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def _value(self, key: str, default: Any) -> Any:
        value = self.raw.get(key)
        if value is None:
            if default is _MISSING:
                raise ValueError(f"{self.source}: missing key {key!r}")
            return default
        return value

    def integer(self, key: str, default: Any = _MISSING, maximum: int | None = None) -> int:
        value = self._value(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 2048.0: some exporters write integers as floats
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{self.source}: {key} must be a positive integer, got {value!r}")
        if maximum is not None and value > maximum:
            raise ValueError(f"{self.source}: {key}={value} is larger than {maximum}")
        return value

    def number(self, key: str, default: Any = _MISSING) -> float:
        value = self._value(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.source}: {key} must be a number, got {value!r}")
        if not 0.0 < value < math.inf:
            raise ValueError(f"{self.source}: {key} must be positive and finite, got {value!r}")
        return float(value)

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        value = self._value(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"{self.source}: {key} must be true or false, got {value!r}")
        return value


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
    # Plan step N+1 while step N runs on the GPU (None: on for CUDA with one GPU, off otherwise).
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
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise ValueError(
                "async_scheduling is not supported with tensor_parallel_size > 1 (only rank 0 "
                "samples, so the workers cannot resolve the next step's input tokens)"
            )

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
