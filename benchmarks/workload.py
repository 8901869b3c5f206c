"""What the engine benchmarks run: nano-vllm's bench workload, Qwen3 model shapes with dummy
weights, and the CPU smoke setup (a tiny random checkpoint, a handful of short requests)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from minivllm.demo import make_demo_checkpoint

NUM_SEQS, MAX_INPUT_LEN, MAX_OUTPUT_LEN = 256, 1024, 1024

# Qwen3 architectures by name, as overrides of demo.py's "qwen3-0.6b" config (the values of the
# public Qwen3-8B and Qwen3-14B config.json; both untie the LM head from the embedding).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "0.6b": {},
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
    "14b": {
        "hidden_size": 5120,
        "intermediate_size": 17408,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
}

# --smoke: enough of the workload to run every code path on the CPU in seconds.
SMOKE_NUM_SEQS, SMOKE_PROMPT_LEN, SMOKE_OUTPUT_LEN = 6, 40, 12


def nano_vllm_workload(num_seqs: int = NUM_SEQS) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's bench.py, draw for draw: seed 0; all prompts first (ids uniform 0..10000,
    lengths uniform 100..1024), then all max_tokens (uniform 100..1024)."""
    random.seed(0)
    prompts = [
        [random.randint(0, 10000) for _ in range(random.randint(100, MAX_INPUT_LEN))]
        for _ in range(num_seqs)
    ]
    max_tokens = [random.randint(100, MAX_OUTPUT_LEN) for _ in range(num_seqs)]
    return prompts, max_tokens


def smoke_workload(vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """The workload's first requests, cut short and folded into a tiny model's vocabulary."""
    prompts, max_tokens = nano_vllm_workload(SMOKE_NUM_SEQS)
    prompts = [[t % vocab_size for t in p[:SMOKE_PROMPT_LEN]] for p in prompts]
    return prompts, [min(m, SMOKE_OUTPUT_LEN) for m in max_tokens]


def make_model_dir(path: str | Path, shape: str = "0.6b", smoke: bool = False) -> Path:
    """A checkpoint folder: Qwen3 of `shape` without weights (load with `engine_args`' dummy
    format), or with `smoke` the tiny random checkpoint, weights included."""
    if smoke:
        return make_demo_checkpoint(Path(path) / "tiny", "tiny")
    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose from {', '.join(MODEL_SHAPES)}")
    return make_demo_checkpoint(
        Path(path) / f"qwen3-{shape}", "qwen3-0.6b", write_weights=False, **MODEL_SHAPES[shape]
    )


def engine_args(smoke: bool) -> dict[str, Any]:
    """LLM(...) arguments of a benchmark run: bf16 dummy weights drawn on the GPU, or the smoke
    checkpoint on the CPU."""
    if smoke:
        return {"device": "cpu", "seed": 0}
    return {"dtype": "bfloat16", "load_format": "dummy", "seed": 0}
