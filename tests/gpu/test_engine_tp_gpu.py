"""Tensor parallelism on GPUs: tensor_parallel_size=2 over NCCL (rank i on cuda:i) against one GPU.

Written without a multi-GPU machine at hand: it has not been run yet (the CPU tests in
tests/test_engine_tp.py cover the same engine path over gloo). It needs two visible GPUs and is
skipped otherwise. With N > 1 every step runs eagerly (no CUDA graphs), so the one-GPU engine is
compared with graphs on and off.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_fixtures import make_hf_checkpoint, mixed_prompts
from minivllm import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def gpu_qwen3_tp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernels' head_dim 64, 4 heads / 2 KV heads (one KV head per rank), float32 weights."""
    return make_hf_checkpoint(
        tmp_path_factory.mktemp("gpu_qwen3_tp"),
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )


def greedy_ids(path: Path, prompts: list[list[int]], **kwargs) -> list[list[int]]:
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("num_kv_blocks", 256)
    kwargs.setdefault("max_num_batched_tokens", 256)  # long prompts are chunked
    with LLM(str(path), device="cuda", max_model_len=512, max_num_seqs=32, **kwargs) as llm:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert llm.num_free_blocks == llm.runtime.num_kv_blocks
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_tp2_matches_one_gpu(gpu_qwen3_tp, enforce_eager):
    prompts = mixed_prompts(12, seed=21, min_len=1, max_len=300)
    one = greedy_ids(gpu_qwen3_tp, prompts, enforce_eager=enforce_eager)
    two = greedy_ids(gpu_qwen3_tp, prompts, tensor_parallel_size=2)
    assert two == one


def test_tp2_sized_pool_and_dummy_weights(gpu_qwen3_tp):
    """The pool sized from memory (min over ranks) and dummy weights equal to one GPU's."""
    prompts = mixed_prompts(4, seed=22, max_len=64)
    kwargs = {"load_format": "dummy", "seed": 5, "num_kv_blocks": None}
    one = greedy_ids(gpu_qwen3_tp, prompts, **kwargs)
    two = greedy_ids(gpu_qwen3_tp, prompts, tensor_parallel_size=2, **kwargs)
    assert two == one
