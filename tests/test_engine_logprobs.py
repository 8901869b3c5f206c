"""Logprobs, prompt logprobs and n completions, against transformers on the same checkpoint.

Logprobs are log_softmax of the model's raw float32 logits (what vLLM reports by default): the
sampled token's, its rank, and the top-N; prompt logprobs score each prompt token after the first.
"""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import SCHEDULERS, assert_all_blocks_free, hf_model, make_llm, mixed_prompts
from minivllm import SamplingParams


def hf_logprobs(path, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of `ids`: [len(ids), vocab]."""
    with torch.inference_mode():
        logits = hf_model(str(path))(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_sample_logprobs_match_transformers(tiny_qwen3, scheduler, async_scheduling):
    llm = make_llm(tiny_qwen3, scheduler=scheduler, async_scheduling=async_scheduling)
    prompts = mixed_prompts(3, seed=81, min_len=2, max_len=30)
    params = [
        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.8, seed=5, max_tokens=5, ignore_eos=True, logprobs=0),
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),  # none asked
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert outs[2].outputs[0].logprobs is None
    for prompt, sp, out in zip(prompts[:2], params[:2], outs[:2]):
        c = out.outputs[0]
        assert len(c.logprobs) == len(c.token_ids) == sp.max_tokens
        ref = hf_logprobs(tiny_qwen3, prompt + c.token_ids)
        for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            row = ref[len(prompt) - 1 + i]
            assert abs(entry[token].logprob - row[token].item()) < 1e-4
            assert entry[token].rank == int((row > row[token]).sum()) + 1
            top = row.topk(sp.logprobs).indices.tolist()
            assert set(entry) == {token, *top}
            for r, tid in enumerate(top):
                assert entry[tid].rank == r + 1
                assert abs(entry[tid].logprob - row[tid].item()) < 1e-4
            if sp.temperature == 0:
                assert entry[token].rank == 1
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_prompt_logprobs_match_transformers(tiny_qwen3, scheduler):
    """Chunked prefill (a 24-token budget) and a prompt whose prefix is cached: every prompt
    token after the first is scored, once, from the full computation."""
    llm = make_llm(tiny_qwen3, scheduler=scheduler, block_size=4, max_num_batched_tokens=24)
    prompt = mixed_prompts(1, seed=82, min_len=50, max_len=50)[0]
    llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)  # fills the cache
    sp = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    ref = hf_logprobs(tiny_qwen3, prompt)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry, row, token = out.prompt_logprobs[pos], ref[pos - 1], prompt[pos]
        assert abs(entry[token].logprob - row[token].item()) < 1e-4
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        assert set(entry) == {token, *row.topk(2).indices.tolist()}
    assert_all_blocks_free(llm)


def test_n_completions(tiny_qwen3):
    """n=3 with a seed: repeatable, the completions differ (seed + index), later completions hit
    the prefix cache the first one filled; greedy n=3 gives three equal completions."""
    llm = make_llm(tiny_qwen3, block_size=4)
    prompt = mixed_prompts(1, seed=83, min_len=33, max_len=33)[0]
    sp = SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=8, ignore_eos=True)
    hits = llm.stats["prefix_cache_hits"]
    first = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert llm.stats["prefix_cache_hits"] - hits >= 2 * 32  # two children hit 8 full blocks
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in first.outputs}) == 3
    again = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in first.outputs]
    # Completion i draws as a single completion seeded seed + i does.
    for i, c in enumerate(first.outputs):
        one = SamplingParams(temperature=1.0, seed=7 + i, max_tokens=8, ignore_eos=True)
        assert llm.generate([prompt], one, use_tqdm=False)[0].outputs[0].token_ids == c.token_ids
    greedy = SamplingParams(temperature=0.0, n=3, max_tokens=5, ignore_eos=True)
    out = llm.generate([prompt], greedy, use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1
    assert_all_blocks_free(llm)
