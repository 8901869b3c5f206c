"""The model's architecture, read from a checkpoint's config.json (ModelConfig).

Every key is read through typed getters: a value of the wrong type or out of range is a
ValueError naming the file and the key.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minivllm.limits import INT32_MAX

# Architectures minivllm can run, and whether their attention has a q/k RMSNorm and a qkv bias.
SUPPORTED_ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2"}


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
