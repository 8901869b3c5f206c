"""MinivLLM compatibility: `LLMEngine(config=dict)` with MinivLLM's configuration dictionary.

MinivLLM (the learning project minivllm grew from) builds a random-weight Qwen3 from a flat dict of
engine and architecture keys. This shim writes that architecture as a checkpoint folder (config
only; weights are random, load_format="dummy") and runs it on minivllm's LLM. Key mapping:

    max_num_sequences -> max_num_seqs        max_model_length -> max_model_len
    max_cached_blocks -> num_kv_blocks (an upper bound: no more than full concurrency needs)
    world_size -> tensor_parallel_size       eos -> eos_token_id of the checkpoint
    num_heads / num_kv_heads / num_layers / base / rms_norm_epsilon / max_position / qkv_bias /
    ffn_bias -> Qwen3 config.json fields     max_num_batch_tokens, scale: accepted, not used
    (minivllm sizes its warm-up from max_num_batched_tokens and uses Qwen3's head_dim**-0.5)

model_name_or_path names the tokenizer: a local folder, or a hub name already in the local
Hugging Face cache. Without one, the shim uses minivllm's demo tokenizer, extended with
placeholder tokens `<|id_N|>` to the model's vocabulary size so that every sampled id shows in the
text, and says so in one warning.
minivllm's own engine arguments (dtype, device, scheduler, attention_backend, seed,
enable_prefix_caching) may be given too. Any other key is a ValueError naming it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from minivllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MINIVLLM_KEYS = frozenset({
    "model_name_or_path", "world_size", "max_num_sequences", "max_num_batched_tokens",
    "max_cached_blocks", "block_size", "eos", "enforce_eager", "gpu_memory_utilization",
    "max_num_batch_tokens", "max_model_length", "vocab_size", "hidden_size", "num_heads",
    "head_dim", "num_kv_heads", "intermediate_size", "num_layers", "tie_word_embeddings", "base",
    "rms_norm_epsilon", "qkv_bias", "scale", "max_position", "ffn_bias",
})  # fmt: skip
PASS_THROUGH_KEYS = frozenset(
    {"dtype", "device", "scheduler", "attention_backend", "seed", "enable_prefix_caching"}
)
_REQUIRED = ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "num_layers")


class LLMEngine:
    """MinivLLM's engine interface on top of minivllm.LLM."""

    def __init__(self, config: dict[str, Any]):
        from minivllm.llm import LLM
        from minivllm.tokenizer import load_tokenizer

        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict, got {type(config).__name__}")
        for key in config:
            if key not in MINIVLLM_KEYS and key not in PASS_THROUGH_KEYS:
                raise ValueError(f"unknown MinivLLM config key {key!r}")
        for key in _REQUIRED:
            if key not in config:
                raise ValueError(f"MinivLLM config is missing {key!r}")
        self.config = dict(config)
        self._dir = Path(tempfile.mkdtemp(prefix="minivllm-compat-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        hf_config = self._write_checkpoint_config(config)
        self._write_tokenizer(config.get("model_name_or_path"), hf_config, load_tokenizer)

        max_num_seqs = int(config.get("max_num_sequences", 16))
        engine_args: dict[str, Any] = {
            "load_format": "dummy",
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": int(config.get("max_num_batched_tokens", 1024)),
            "block_size": int(config.get("block_size", 256)),
            "tensor_parallel_size": int(config.get("world_size", 1)),
            "enforce_eager": bool(config.get("enforce_eager", False)),
            "gpu_memory_utilization": float(config.get("gpu_memory_utilization", 0.9)),
        }
        if "max_model_length" in config:
            engine_args["max_model_len"] = int(config["max_model_length"])
        for key in PASS_THROUGH_KEYS & config.keys():
            engine_args[key] = config[key]
        if "max_cached_blocks" in config:
            # MinivLLM's pool size is a ceiling; allocate no more than full concurrency can use.
            max_len = engine_args.get(
                "max_model_len", min(hf_config["max_position_embeddings"], 4096)
            )
            per_seq = -(-max_len // engine_args["block_size"])
            engine_args["num_kv_blocks"] = min(
                int(config["max_cached_blocks"]), max(per_seq, max_num_seqs * per_seq)
            )
        self.llm = LLM(str(self._dir), **engine_args)
        self.tokenizer = self.llm.tokenizer

    def _write_checkpoint_config(self, c: dict[str, Any]) -> dict[str, Any]:
        hidden, heads = int(c["hidden_size"]), int(c["num_heads"])
        max_len = int(c.get("max_model_length", 0))
        dtype = c.get("dtype") or ("bfloat16" if torch.cuda.is_available() else "float32")
        vocab = int(c["vocab_size"])
        eos = c.get("eos")
        # An eos id outside the vocabulary can never be sampled: it is left out (transformers
        # warns about such a config.json).
        eos_ids = [e for e in ([eos] if isinstance(eos, int) else eos or []) if 0 <= e < vocab]
        eos = None if not eos_ids else eos_ids[0] if isinstance(eos, int) else eos_ids
        hf_config = {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(c["intermediate_size"]),
            "num_hidden_layers": int(c["num_layers"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(c.get("num_kv_heads") or heads),
            "head_dim": int(c.get("head_dim") or hidden // heads),
            "tie_word_embeddings": bool(c.get("tie_word_embeddings", False)),
            "rope_theta": float(c.get("base", 10000)),
            "rms_norm_eps": float(c.get("rms_norm_epsilon", 1e-6)),
            "attention_bias": bool(c.get("qkv_bias", False)),
            "mlp_bias": bool(c.get("ffn_bias", False)),
            "max_position_embeddings": max(int(c.get("max_position", 16384)), max_len),
            "torch_dtype": str(dtype).removeprefix("torch."),
            "eos_token_id": eos,
        }
        if c.get("scale", 1) != 1:
            logger.warning("MinivLLM 'scale'=%s is ignored: Qwen3 uses head_dim**-0.5", c["scale"])
        (self._dir / "config.json").write_text(json.dumps(hf_config, indent=2))
        if eos is not None:
            gen = {"eos_token_id": eos if isinstance(eos, list) else [eos]}
            (self._dir / "generation_config.json").write_text(json.dumps(gen))
        return hf_config

    def _write_tokenizer(self, name: str | None, hf_config: dict[str, Any], load: Any) -> None:
        from minivllm.demo import save_demo_tokenizer

        tokenizer = load(name, warn=False) if name else None
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self._dir))
            return
        eos = hf_config["eos_token_id"]
        save_demo_tokenizer(
            self._dir,
            vocab_size=min(2048, hf_config["vocab_size"]),
            model_max_length=hf_config["max_position_embeddings"],
            num_ids=hf_config["vocab_size"],
            special_ids=eos if isinstance(eos, list) else [] if eos is None else [eos],
        )
        if not name:
            why = "the config has no model_name_or_path"
        elif Path(name).is_dir():
            why = f"model_name_or_path={name!r} holds no usable tokenizer"
        else:
            why = (
                f"model_name_or_path={name!r} is neither a local folder nor in the local "
                "Hugging Face cache"
            )
        logger.warning(
            "%s, so minivllm's demo tokenizer is used: a small byte-level BPE whose ids past its "
            "own vocabulary decode as placeholders <|id_N|> (up to the model's %d ids). Text "
            "prompts do not tokenize as the real tokenizer would; pass model_name_or_path=<a "
            "tokenizer folder> for real text.",
            why,
            hf_config["vocab_size"],
        )

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> dict[str, list[Any]]:
        """MinivLLM's return shape: {"text": [...], "token_ids": [...]}, in prompt order."""
        outputs = self.llm.generate(prompts, sampling_params, use_tqdm=use_tqdm)
        return {
            "text": [o.outputs[0].text for o in outputs],
            "token_ids": [o.outputs[0].token_ids for o in outputs],
        }
