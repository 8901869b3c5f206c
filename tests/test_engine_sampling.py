"""Sampling: top_k=1 is greedy, seeds reproduce whatever the batch, filters keep what they should,
stop strings / stop token ids / length caps end where they should."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from engine_fixtures import SCHEDULERS, assert_all_blocks_free, make_llm, mixed_prompts
from minivllm import SamplingParams
from minivllm.engine.reference import sampling_uniforms
from minivllm.layers.sampler import Sampler, SamplingTensors


def _ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_top_k_1_equals_greedy(tiny_llm):
    prompts = mixed_prompts(4, seed=31)
    greedy = tiny_llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False
    )
    top1 = tiny_llm.generate(
        prompts, SamplingParams(temperature=1.3, top_k=1, max_tokens=10, seed=5), use_tqdm=False
    )
    assert _ids(top1) == _ids(greedy)
    assert_all_blocks_free(tiny_llm)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_qwen3, scheduler):
    llm = make_llm(tiny_qwen3, scheduler=scheduler)
    target = mixed_prompts(1, seed=41, min_len=12, max_len=12)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=1234, ignore_eos=True)
    alone = llm.generate([target], seeded, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate([target], seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == again
    # Same request among others (different lengths, unseeded, greedy), in another position.
    others = mixed_prompts(5, seed=42)
    params = [SamplingParams(temperature=0.7, max_tokens=30, ignore_eos=True)] * 3 + [
        SamplingParams(temperature=0, max_tokens=5)
    ] * 2
    crowd = llm.generate(
        others[:3] + [target] + others[3:], params[:3] + [seeded] + params[3:], use_tqdm=False
    )
    assert crowd[3].outputs[0].token_ids == alone
    # A different seed gives a different completion (24 tokens over ~500 choices).
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=99, ignore_eos=True)
    assert llm.generate([target], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone
    # Seeds are 64-bit: 1234 + 2**63 is another seed (it sampled as 1234 when they were cut to
    # 63 bits), and the largest one works.
    for seed in (1234 + 2**63, 2**64 - 1):
        high = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=seed, ignore_eos=True)
        assert llm.generate([target], high, use_tqdm=False)[0].outputs[0].token_ids != alone
    assert_all_blocks_free(llm)


def test_unseeded_sampling_follows_engine_seed(tiny_qwen3):
    prompts = mixed_prompts(3, seed=43)
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    runs = [
        _ids(make_llm(tiny_qwen3, seed=s).generate(prompts, params, use_tqdm=False))
        for s in (0, 0, 1)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


# ---- the sampler alone -----------------------------------------------------------------------


def _sample(logits, n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Draw n samples from one row of logits (n rows with different uniforms)."""
    s = n
    u = sampling_uniforms(np.full(s, 7, dtype=np.uint64), np.arange(s, dtype=np.int64))
    st = SamplingTensors(
        temperature=torch.full((s,), temperature),
        top_k=torch.full((s,), top_k, dtype=torch.int32),
        top_p=torch.full((s,), top_p),
        min_p=torch.full((s,), min_p),
        uniforms=torch.from_numpy(u.astype(np.float32)),
        all_greedy=temperature == 0,
        any_top_k_or_p=top_k > 0 or top_p < 1,
        any_min_p=min_p > 0,
    )
    return Sampler()(logits.expand(s, -1).contiguous(), st)


LOGITS = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))


def test_sampler_matches_distribution():
    counts = torch.bincount(_sample(LOGITS, 20000), minlength=5).float() / 20000
    assert torch.allclose(counts, LOGITS.exp()[0], atol=0.015)


def test_sampler_temperature_sharpens():
    counts = torch.bincount(_sample(LOGITS, 20000, temperature=0.5), minlength=5).float() / 20000
    expected = torch.softmax(LOGITS[0] / 0.5, dim=-1)
    assert torch.allclose(counts, expected, atol=0.015)


def test_sampler_top_k_top_p_min_p():
    assert set(_sample(LOGITS, 2000, top_k=2).tolist()) == {1, 3}
    # top_p 0.75: 0.4 + 0.3 < 0.75, so the third (0.15) is needed as well.
    assert set(_sample(LOGITS, 2000, top_p=0.75).tolist()) == {1, 3, 4}
    assert set(_sample(LOGITS, 2000, top_p=0.7).tolist()) == {1, 3}
    # min_p 0.3: keep tokens with p >= 0.3 * 0.4 = 0.12.
    assert set(_sample(LOGITS, 2000, min_p=0.3).tolist()) == {1, 3, 4}
    assert set(_sample(LOGITS, 2000, temperature=0).tolist()) == {1}
    combined = _sample(LOGITS, 4000, top_k=2, top_p=0.99)
    counts = torch.bincount(combined, minlength=5).float() / 4000
    assert abs(counts[1] - 4 / 7) < 0.03 and abs(counts[3] - 3 / 7) < 0.03


def test_sampling_uniforms_range_and_spread():
    u = sampling_uniforms(np.arange(1000, dtype=np.uint64), np.zeros(1000, dtype=np.int64))
    assert ((u >= 0) & (u < 1)).all()
    assert abs(u.mean() - 0.5) < 0.05 and len(np.unique(u)) == 1000


# ---- stopping ------------------------------------------------------------------------------


def _greedy(llm, prompt, n=24, **kw):
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)
    return llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]


def test_stop_token_ids(tiny_llm):
    prompt = mixed_prompts(1, seed=51, min_len=9, max_len=9)[0]
    full = _greedy(tiny_llm, prompt)
    stop_id = full.token_ids[6]
    first = full.token_ids.index(stop_id)
    out = _greedy(tiny_llm, prompt, stop_token_ids=[stop_id])
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # The stop token's text is not in the text (vLLM's rule) unless asked for; the same when
    # the completion is followed step by step (a stop string that never appears).
    decode = tiny_llm.tokenizer.decode
    assert out.text == decode(out.token_ids[:-1]) and out.text != decode(out.token_ids)
    followed = _greedy(tiny_llm, prompt, stop_token_ids=[stop_id], stop="\x00never")
    assert followed.text == out.text and followed.token_ids == out.token_ids
    for kw in ({}, {"stop": "\x00never"}):
        kept = _greedy(
            tiny_llm, prompt, stop_token_ids=[stop_id], include_stop_str_in_output=True, **kw
        )
        assert kept.text == decode(out.token_ids) and kept.token_ids == out.token_ids
    assert_all_blocks_free(tiny_llm)


def test_eos_stops_unless_ignored(tiny_llm, tiny_qwen3, tmp_path):
    prompt = mixed_prompts(1, seed=52, min_len=9, max_len=9)[0]
    full = _greedy(tiny_llm, prompt)
    eos = full.token_ids[4]
    first = full.token_ids.index(eos)
    # The same weights, with generation_config.json naming that token as an extra eos.
    for f in tiny_qwen3.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    llm = make_llm(tmp_path)
    assert eos in llm.runtime.eos_token_ids and 2 in llm.runtime.eos_token_ids
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert out[0].outputs[0].token_ids == full.token_ids[: first + 1]
    assert out[0].outputs[0].finish_reason == "stop"
    assert _greedy(llm, prompt).token_ids == full.token_ids  # ignore_eos=True
    assert_all_blocks_free(llm)


def test_stop_strings(tiny_llm):
    prompt = mixed_prompts(1, seed=53, min_len=9, max_len=9)[0]
    full = _greedy(tiny_llm, prompt)
    text = full.text
    assert len(text) > 12
    stop = text[8:12]
    cut = text.find(stop)
    out = _greedy(tiny_llm, prompt, stop=[stop, "never-appears"])
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = _greedy(tiny_llm, prompt, stop=[stop], include_stop_str_in_output=True)
    assert kept.text == text[: cut + len(stop)] and kept.token_ids == out.token_ids
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < len(full.token_ids)
    assert_all_blocks_free(tiny_llm)
    # A stop string that never appears changes nothing.
    same = _greedy(tiny_llm, prompt, stop="never-appears")
    assert same.token_ids == full.token_ids and same.finish_reason == "length"


def test_stop_strings_in_a_batch(tiny_llm):
    prompts = mixed_prompts(4, seed=54, min_len=5, max_len=20)
    fulls = [_greedy(tiny_llm, p) for p in prompts]
    stops = [f.text[5:8] for f in fulls]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=s) for s in stops]
    outs = tiny_llm.generate(prompts, params, use_tqdm=False)
    for full, stop, out in zip(fulls, stops, outs):
        assert out.outputs[0].text == full.text[: full.text.find(stop)]
        assert out.outputs[0].finish_reason == "stop"
    assert_all_blocks_free(tiny_llm)


def test_max_model_length_caps_prompt_plus_output(tiny_llm):
    prompt = mixed_prompts(1, seed=55, min_len=10, max_len=10)[0]
    out = tiny_llm.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, max_model_length=15),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_engine_max_model_len_caps_output(tiny_qwen3):
    llm = make_llm(tiny_qwen3, max_model_len=32, block_size=8)
    prompt = mixed_prompts(1, seed=56, min_len=20, max_len=20)[0]
    out = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    assert_all_blocks_free(llm)
