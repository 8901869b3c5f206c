"""Tensor parallelism on GPUs: tensor_parallel_size=2 over NCCL (rank i on cuda:i) against one GPU.

The CPU tests in tests/test_engine_tp.py cover the same engine path over gloo. These need two
visible GPUs and are skipped otherwise. With N > 1 every step runs eagerly (no CUDA graphs), so
the one-GPU engine is compared with graphs on and off; TP=2 runs synchronous and with async
scheduling.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_fixtures import mixed_prompts
from minivllm import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def greedy_ids(path: Path, prompts: list[list[int]], **kwargs) -> list[list[int]]:
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("num_kv_blocks", 256)
    kwargs.setdefault("max_num_batched_tokens", 256)  # long prompts are chunked
    with LLM(str(path), device="cuda", max_model_len=512, max_num_seqs=32, **kwargs) as llm:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert llm.num_free_blocks == llm.runtime.num_kv_blocks
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize(("enforce_eager", "async_scheduling"), [(True, False), (False, True)])
def test_tp2_matches_one_gpu(gpu_qwen3, enforce_eager, async_scheduling):
    """TP=2 synchronous against one GPU eager; TP=2 with async scheduling (every rank samples
    and resolves its own placeholders) against one GPU with graphs."""
    prompts = mixed_prompts(12, seed=21, min_len=1, max_len=300)
    one = greedy_ids(gpu_qwen3, prompts, enforce_eager=enforce_eager)
    two = greedy_ids(gpu_qwen3, prompts, tensor_parallel_size=2, async_scheduling=async_scheduling)
    assert two == one


def test_tp2_async_seeded_sampling_matches_sync(gpu_qwen3):
    """Seeded sampling under TP=2: async scheduling gives the synchronous engine's tokens."""
    prompts = mixed_prompts(8, seed=23, max_len=64)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, ignore_eos=True, seed=3)
    outs = []
    for async_scheduling in (False, True):
        with LLM(
            str(gpu_qwen3),
            device="cuda",
            dtype="float32",
            max_model_len=512,
            num_kv_blocks=256,
            tensor_parallel_size=2,
            async_scheduling=async_scheduling,
        ) as llm:
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    assert outs[0] == outs[1]


def test_tp2_sized_pool_and_dummy_weights(gpu_qwen3):
    """The pool sized from memory (min over ranks) and dummy weights equal to one GPU's."""
    prompts = mixed_prompts(4, seed=22, max_len=64)
    kwargs = {"load_format": "dummy", "seed": 5, "num_kv_blocks": None}
    one = greedy_ids(gpu_qwen3, prompts, **kwargs)
    two = greedy_ids(gpu_qwen3, prompts, tensor_parallel_size=2, **kwargs)
    assert two == one
