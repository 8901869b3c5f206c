"""The engine with every layer on its fused Triton path (as on a GPU), on the CPU interpreter: a
float16 model gives the same greedy tokens as with the plain torch layers, and prompt logprobs
within float16 rounding; the decode steps (<= GATED_MAX_TOKENS rows) run gate/up's GEMM with
SiLU-and-multiply in its epilogue. tests/gpu runs the same paths in bf16 with CUDA graphs.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from engine_fixtures import assert_all_blocks_free, make_llm, mixed_prompts
from minivllm import SamplingParams


class _Run(NamedTuple):
    tokens: list[list[int]]  # greedy tokens per prompt
    logprobs: list[list[float]]  # prompt logprobs per prompt
    gated_rows: list[int]  # gate/up's gated GEMM sizes
    early: int  # Triton GEMMs reading weight columns before their PDL wait (`early`)
    qkv_partials: int  # qkv GEMMs giving split-K partial sums (`splits`)


def _run(path, monkeypatch, fused: bool, switches: dict | None = None, max_len: int = 30) -> _Run:
    """A small greedy run; `switches` sets layers.linear's / layers.attention's switches of that
    name for the run."""
    import minivllm.layers
    from minivllm.kernels import linear
    from minivllm.layers import attention
    from minivllm.layers import linear as linear_layers

    with monkeypatch.context() as mp:
        mp.setattr(minivllm.layers, "fused_kernels_on", lambda device: fused)
        for name, value in (switches or {}).items():
            mp.setattr(linear_layers if hasattr(linear_layers, name) else attention, name, value)
        gated_rows: list[int] = []
        early = [0]
        qkv_partials = [0]
        original = linear.linear

        def spy(x, weight, *args, **kwargs):
            if kwargs.get("gated"):
                gated_rows.append(x.shape[0])
            early[0] += kwargs.get("early", 0) > 0
            qkv_partials[0] += kwargs.get("splits", 0) > 0
            return original(x, weight, *args, **kwargs)

        mp.setattr(linear, "linear", spy)
        llm = make_llm(
            path,
            dtype="float16",
            attention_backend="triton",
            block_size=16,
            max_num_seqs=4,
            max_num_batched_tokens=64,
        )
        prompts = mixed_prompts(3, seed=71, min_len=6, max_len=max_len)
        sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=0)
        outs = llm.generate(prompts, sp, use_tqdm=False)
        assert_all_blocks_free(llm)
        llm.close()
    logprobs = [[next(iter(p.values())).logprob for p in out.prompt_logprobs[1:]] for out in outs]
    tokens = [out.outputs[0].token_ids for out in outs]
    return _Run(tokens, logprobs, gated_rows, early[0], qkv_partials[0])


def test_fused_layers_match_the_plain_ones(tiny_qwen3, monkeypatch) -> None:
    from minivllm.layers.linear import GATED_MAX_TOKENS

    plain_tokens, plain_logprobs, plain_gated, _, _ = _run(tiny_qwen3, monkeypatch, fused=False)
    tokens, logprobs, gated, early, qkv_partials = _run(tiny_qwen3, monkeypatch, fused=True)
    assert qkv_partials == 0  # MINIVLLM_QKV_SPLITS is off by default
    assert early  # decode steps: GEMM_EARLY_COLUMNS by default
    assert plain_gated == []
    assert gated and max(gated) <= GATED_MAX_TOKENS  # decode steps only
    for got, expect in zip(logprobs, plain_logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expect), atol=3e-2, rtol=3e-2)
    assert tokens == plain_tokens


def test_the_early_loads_match_the_plain_decode(gpu_qwen3, monkeypatch):
    """The default early weight columns in the GEMMs (GEMM_EARLY_COLUMNS) and early decode loads
    (DECODE_EARLY_LOADS), on tests/gpu's head_dim 64 model, against both off: the same greedy
    tokens, prompt logprobs within float16 rounding, and each route taken."""
    from minivllm.kernels import paged_decode

    calls = {"early": 0}
    original_decode = paged_decode.decode_attention

    def decode(*args, **kwargs):
        calls["early"] += bool(kwargs.get("early_loads"))
        return original_decode(*args, **kwargs)

    off = {"DECODE_EARLY_LOADS": False, "GEMM_EARLY_COLUMNS": 0}
    # Contexts past 256 tokens: the decode runs two splits.
    expect_tokens, expect_logprobs, *_ = _run(gpu_qwen3, monkeypatch, True, off, max_len=300)
    monkeypatch.setattr(paged_decode, "decode_attention", decode)
    on = {"DECODE_EARLY_LOADS": True, "GEMM_EARLY_COLUMNS": 128}
    tokens, logprobs, _, early, _ = _run(gpu_qwen3, monkeypatch, True, on, max_len=300)
    assert calls["early"] and early, (calls, early)
    for got, expect in zip(logprobs, expect_logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expect), atol=3e-2, rtol=3e-2)
    assert tokens == expect_tokens


@pytest.mark.parametrize("splits", [2, 4])
def test_qkv_partials_match_the_plain_qkv(tiny_qwen3, monkeypatch, splits: int) -> None:
    """MINIVLLM_QKV_SPLITS: the decode steps' qkv GEMM gives split-K partial sums, which the
    rotary kernel adds up as it stores k and v; the same greedy tokens as the plain qkv GEMM,
    prompt logprobs within float16 rounding."""
    expect = _run(tiny_qwen3, monkeypatch, True)
    got = _run(tiny_qwen3, monkeypatch, True, {"QKV_SPLITS": splits})
    assert got.qkv_partials > 0 and expect.qkv_partials == 0
    for have, want in zip(got.logprobs, expect.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(have), torch.tensor(want), atol=3e-2, rtol=3e-2)
    assert got.tokens == expect.tokens


@pytest.fixture(autouse=True)
def _interpreter_only() -> None:
    if torch.cuda.is_available():
        pytest.skip("the interpreter's run of the fused paths; tests/gpu covers the GPU")
