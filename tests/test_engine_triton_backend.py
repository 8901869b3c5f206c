"""The triton attention backend inside the engine (through the Triton interpreter on the CPU, in
float32) gives transformers' greedy tokens, with mixed decode + prefill-chunk steps, run eagerly
or the way the mixed-step CUDA graph runs them (one tile-table launch of the flash kernel)."""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    # Must be set before @triton.jit decorates the kernels (see tests/kernels/conftest.py).
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("kv_store", "flash_prefill", "decode_split", "decode_tiles", "paged_decode"):
        _module = sys.modules.get(f"minivllm.kernels.{_name}")
        if _module is not None:
            importlib.reload(_module)

import pytest  # noqa: E402
from engine_fixtures import (  # noqa: E402
    EagerGraphRunner,
    assert_all_blocks_free,
    hf_greedy,
    make_llm,
    mixed_prompts,
)
from minivllm import SamplingParams  # noqa: E402


def test_triton_backend_matches_transformers(tiny_qwen3):
    llm = make_llm(
        tiny_qwen3,
        attention_backend="triton",
        block_size=16,
        max_num_seqs=4,
        max_num_batched_tokens=24,  # chunked prefill beside running decodes
    )
    assert llm.model_runner.backend.name == "triton"
    prefix = mixed_prompts(1, seed=61, min_len=40, max_len=40)[0]
    prompts = [prefix + [9, 10], mixed_prompts(1, seed=62, min_len=5, max_len=5)[0], prefix]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(tiny_qwen3, prompt, 6)
    assert llm.stats["prefix_cache_hits"] > 0
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_mixed_graph_path_with_the_tile_table_kernel(tiny_qwen3, async_scheduling):
    """Steps with prefill of 16..32 tokens staged for the mixed graph and run eagerly on its
    fixed views: the Triton flash kernel walks the tile table over decodes (one-token queries),
    chunks after a cached prefix and padding tokens; async placeholders resolve as in the
    graph. Greedy tokens equal transformers'."""
    llm = make_llm(
        tiny_qwen3,
        attention_backend="triton",
        block_size=16,
        max_num_seqs=6,
        max_num_batched_tokens=32,
        async_scheduling=async_scheduling,
    )
    runner = llm.model_runner
    runner.graph_runner = replay = EagerGraphRunner(runner, mixed_tokens=32)
    prefix = mixed_prompts(1, seed=61, min_len=40, max_len=40)[0]
    prompts = [
        prefix + [9, 10],
        mixed_prompts(1, seed=62, min_len=5, max_len=5)[0],
        prefix,
        mixed_prompts(1, seed=63, min_len=20, max_len=20)[0],
        mixed_prompts(1, seed=64, min_len=12, max_len=12)[0],
    ]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(tiny_qwen3, prompt, 6)
    assert len(replay.replayed_mixed) >= 2 and any(n < 32 for n in replay.replayed_mixed)
    assert llm.stats["prefix_cache_hits"] > 0
    assert_all_blocks_free(llm)
