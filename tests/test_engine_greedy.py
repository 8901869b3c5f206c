"""Greedy outputs equal transformers' greedy generate token for token (CPU, float32)."""

from __future__ import annotations

import pytest
from engine_fixtures import (
    SCHEDULERS,
    assert_all_blocks_free,
    hf_greedy,
    make_llm,
    mixed_prompts,
)
from minivllm import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def check_against_hf(llm, path, prompts, params=GREEDY):
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    for prompt, out in zip(prompts, outputs):
        expected = hf_greedy(path, prompt, params.max_tokens)
        assert out.outputs[0].token_ids == expected, f"prompt of {len(prompt)} tokens"
        assert out.outputs[0].finish_reason == "length"
    assert_all_blocks_free(llm)
    return outputs


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("block_size", [1, 16, 256])
def test_mixed_batch(tiny_qwen3, scheduler, block_size):
    llm = make_llm(tiny_qwen3, scheduler=scheduler, block_size=block_size)
    check_against_hf(llm, tiny_qwen3, mixed_prompts(6, seed=block_size))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_chunked_prefill(tiny_qwen3, scheduler):
    # A 16-token budget splits every prompt (up to 90 tokens) into many chunks, interleaved
    # with other sequences' decodes.
    llm = make_llm(tiny_qwen3, scheduler=scheduler, max_num_batched_tokens=16, max_num_seqs=4)
    check_against_hf(llm, tiny_qwen3, mixed_prompts(5, seed=7, min_len=20, max_len=90))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_shared_prefixes(tiny_qwen3, scheduler, enable_prefix_caching):
    prefix = mixed_prompts(1, seed=3, min_len=70, max_len=70)[0]
    suffixes = mixed_prompts(4, seed=4, min_len=1, max_len=9)
    prompts = [prefix + s for s in suffixes] + [prefix[:40], prefix]
    llm = make_llm(
        tiny_qwen3, scheduler=scheduler, block_size=16, enable_prefix_caching=enable_prefix_caching
    )
    check_against_hf(llm, tiny_qwen3, prompts[:1])  # fills the cache
    check_against_hf(llm, tiny_qwen3, prompts)
    hits = llm.stats["prefix_cache_hits"]
    if enable_prefix_caching:
        assert hits >= 5 * 64  # four full 16-token blocks of the prefix, five more requests
    else:
        assert hits == 0


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_preemption_under_small_pool(tiny_qwen3, scheduler):
    # 10 blocks of 8 tokens: 6 sequences growing to ~40 tokens cannot all stay resident.
    llm = make_llm(
        tiny_qwen3, scheduler=scheduler, block_size=8, num_kv_blocks=10, max_model_len=64
    )
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    check_against_hf(llm, tiny_qwen3, mixed_prompts(6, seed=11, min_len=10, max_len=24), params)
    assert llm.stats["num_preemptions"] > 0


def test_many_steps_one_engine(tiny_llm, tiny_qwen3):
    """Repeated calls on one engine (cache reuse across calls) stay exact."""
    prompts = mixed_prompts(3, seed=21)
    for _ in range(2):
        check_against_hf(tiny_llm, tiny_qwen3, prompts)


def test_sharded_untied_checkpoint(tiny_qwen3_sharded):
    assert len(list(tiny_qwen3_sharded.glob("*.safetensors"))) > 1
    assert (tiny_qwen3_sharded / "model.safetensors.index.json").is_file()
    llm = make_llm(tiny_qwen3_sharded, block_size=16)
    check_against_hf(llm, tiny_qwen3_sharded, mixed_prompts(4, seed=5))


def test_qwen2_checkpoint(tmp_path):
    from engine_fixtures import make_hf_checkpoint

    path = make_hf_checkpoint(tmp_path, architecture="qwen2", num_attention_heads=4)
    llm = make_llm(path, block_size=16)
    check_against_hf(llm, path, mixed_prompts(3, seed=6))
