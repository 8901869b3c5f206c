"""The triton attention backend inside the engine (through the Triton interpreter on the CPU, in
float32) gives transformers' greedy tokens, with mixed decode + prefill-chunk steps."""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    # Must be set before @triton.jit decorates the kernels (see tests/kernels/conftest.py).
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("kv_store", "flash_prefill", "paged_decode"):
        _module = sys.modules.get(f"minivllm.kernels.{_name}")
        if _module is not None:
            importlib.reload(_module)

from engine_fixtures import assert_all_blocks_free, hf_greedy, make_llm, mixed_prompts  # noqa: E402
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
