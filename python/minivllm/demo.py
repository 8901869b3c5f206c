"""Random-weight Qwen3 checkpoints made offline: for `minivllm demo`, the tests and the benchmarks.

`make_demo_checkpoint(dir, size)` writes a Hugging Face model folder: config.json
(Qwen3ForCausalLM), generation_config.json, model.safetensors (unless write_weights=False, for
load_format="dummy") and a tokenizer that transformers.AutoTokenizer loads offline: a byte-level
BPE trained here on a small built-in corpus, with Qwen's <|im_start|>/<|im_end|> chat template.
A model vocabulary larger than the trained one (Qwen3-0.6B's shape) leaves most sampled ids
without text; `decode_every_id=True` gives each of them a placeholder `<|id_N|>` instead.
Random weights produce noise; the point is a real end-to-end run with no download.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Architectures by name. "tiny" runs in a blink on a CPU; "qwen3-0.6b" is Qwen3-0.6B's shape.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        torch_dtype="float32",
        tokenizer_vocab_size=512,
    ),
    "qwen3-0.6b": dict(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        torch_dtype="bfloat16",
        tokenizer_vocab_size=2048,
    ),
}

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A paged key-value cache stores attention keys and
values in fixed-size blocks, so that many sequences can share one pool of memory without
fragmentation. Continuous batching lets new requests join a running batch as soon as others
finish. Prefix caching reuses the blocks of a prompt that another request has already computed.
Chunked prefill splits a long prompt into pieces so that decoding sequences are never starved.
Hello! How are you today? I am a small language model with random weights, so what I say is noise.
What is the capital of France? Paris is the capital of France, and Berlin is the capital of Germany.
Write a short poem about the sea. The sea is wide and blue, the waves roll in and out again.
Explain how a transformer works: tokens are embedded, attention mixes information between them,
and a feed-forward network transforms each position. Rotary embeddings encode positions by rotating
pairs of features. Normalization keeps activations in a stable range.
List the prime numbers below one hundred: 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47,
53, 59, 61, 67, 71, 73, 79, 83, 89, 97. Numbers, letters and punctuation: 0123456789 ,.;:!?'"()[]{}
def main():\n    print("hello world")\n    return 0\nfor i in range(10):\n    total += i * i\n
The user asked a question and the assistant answered it. Give me your opinion on the impact of
artificial intelligence on society. Introduce yourself. Tell me a joke about programmers.
Once upon a time there was a little engine that could; it scheduled, it batched, it never stalled.
"""


def build_demo_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE (every string encodes; no unknown token) with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _CORPUS.splitlines() * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def placeholder_token(token_id: int) -> str:
    """The text of a demo-tokenizer id past its trained vocabulary."""
    return f"<|id_{token_id}|>"


def save_demo_tokenizer(
    path: str | Path,
    vocab_size: int = 512,
    model_max_length: int = 4096,
    num_ids: int | None = None,
    special_ids: Sequence[int] = (),
) -> Path:
    """Write tokenizer.json + tokenizer_config.json (with the chat template) into `path`.

    The small corpus may train fewer than `vocab_size` ids. `num_ids` (the model's vocabulary
    size) extends the vocabulary with placeholder tokens up to that many ids, so that every id
    decodes; the placeholders among `special_ids` (say, the model's eos ids) are special tokens,
    left out of decoded text like the other special tokens.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = json.loads(build_demo_tokenizer(vocab_size).to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    special = {t["content"]: t["id"] for t in spec["added_tokens"]}
    for token_id in range(max(vocab.values()) + 1, num_ids or 0):
        token = placeholder_token(token_id)
        vocab[token] = token_id
        if token_id in special_ids:
            special[token] = token_id
            spec["added_tokens"].append(
                {**spec["added_tokens"][0], "id": token_id, "content": token}
            )
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    added = {
        str(token_id): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, token_id in special.items()
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return path


def demo_config(size: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """config.json contents for a size preset (see SIZES); overrides replace keys."""
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; choose from {', '.join(SIZES)}")
    arch = {k: v for k, v in SIZES[size].items() if k != "tokenizer_vocab_size"}
    arch.update(overrides)
    eos_id = SPECIAL_TOKENS.index(EOS_TOKEN)
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        **arch,
    }


def make_demo_checkpoint(
    path: str | Path,
    size: str = "tiny",
    write_weights: bool = True,
    seed: int = 0,
    decode_every_id: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight Qwen3 checkpoint folder at `path` (created if needed).

    write_weights=False leaves out model.safetensors: load it with load_format="dummy".
    decode_every_id=True extends the tokenizer to the model's vocabulary with placeholder tokens
    (see save_demo_tokenizer), for output that people read; it is off by default because the
    placeholders make the tokenizer large and their text costs time to build.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = demo_config(size, **config_overrides)
    tokenizer_vocab = min(SIZES[size]["tokenizer_vocab_size"], config["vocab_size"])
    (path / "config.json").write_text(json.dumps(config, indent=2))
    eos_id = config["eos_token_id"]
    generation_config = {"eos_token_id": [eos_id], "pad_token_id": config["pad_token_id"]}
    (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    save_demo_tokenizer(
        path,
        tokenizer_vocab,
        config["max_position_embeddings"],
        num_ids=config["vocab_size"] if decode_every_id else None,
        special_ids=[eos_id],
    )
    if write_weights:
        from safetensors.torch import save_file

        save_file(random_qwen3_state_dict(config, seed), str(path / "model.safetensors"))
    return path


def random_qwen3_state_dict(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Hugging Face-named random tensors for a Qwen3 config dict (normal(0, 0.02), unit norms)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, config.get("torch_dtype", "float32"))
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype)

    sd = {"model.embed_tokens.weight": randn(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = randn(heads * head_dim, hidden)
        sd[p + "self_attn.k_proj.weight"] = randn(kv_heads * head_dim, hidden)
        sd[p + "self_attn.v_proj.weight"] = randn(kv_heads * head_dim, hidden)
        sd[p + "self_attn.o_proj.weight"] = randn(hidden, heads * head_dim)
        sd[p + "self_attn.q_norm.weight"] = ones(head_dim)
        sd[p + "self_attn.k_norm.weight"] = ones(head_dim)
        sd[p + "mlp.gate_proj.weight"] = randn(inter, hidden)
        sd[p + "mlp.up_proj.weight"] = randn(inter, hidden)
        sd[p + "mlp.down_proj.weight"] = randn(hidden, inter)
        sd[p + "input_layernorm.weight"] = ones(hidden)
        sd[p + "post_attention_layernorm.weight"] = ones(hidden)
    sd["model.norm.weight"] = ones(hidden)
    if not config.get("tie_word_embeddings", False):
        sd["lm_head.weight"] = randn(config["vocab_size"], hidden)
    return sd
