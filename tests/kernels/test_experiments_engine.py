"""The opt-in kernel paths (minivllm.experiments) inside the engine, on the CPU interpreter: a
float16 model whose layers all take their Triton paths (as on a GPU), run with every experiment
on and with none, gives the same prompt logprobs within float16 rounding and the same greedy
tokens. (CUDA graphs and graph_prewarm need a GPU: tests/gpu runs them under MINIVLLM_EXPERIMENTS.)
"""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import TINY_QWEN3, assert_all_blocks_free, make_llm, mixed_prompts
from minivllm import SamplingParams


def _spy(monkeypatch, module, name: str, calls: list) -> None:
    """Record each call of module.name: its name, keyword arguments and second operand's rows
    (a GEMM's output features)."""
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append((name, kwargs, args[1].shape[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def _run(path, monkeypatch, experiments: str):
    import minivllm.layers
    from minivllm.kernels import flash_prefill, linear, linear_norm, paged_decode

    with monkeypatch.context() as mp:
        mp.setenv("MINIVLLM_EXPERIMENTS", experiments)
        # Every layer takes its fused Triton path, as it would on a GPU.
        mp.setattr(minivllm.layers, "fused_kernels_on", lambda device: True)
        calls: list = []
        _spy(mp, linear, "linear", calls)
        _spy(mp, linear_norm, "linear_add_rmsnorm", calls)
        _spy(mp, flash_prefill, "_prefill_attention", calls)
        _spy(mp, paged_decode, "decode_attention_rope", calls)
        llm = make_llm(
            path,
            dtype="float16",
            attention_backend="triton",
            block_size=16,
            max_num_seqs=4,
            max_num_batched_tokens=64,
        )
        attn = llm.model_runner.model.model.layers[0].self_attn.attn
        prompts = mixed_prompts(3, seed=71, min_len=6, max_len=30)
        sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=0)
        outs = llm.generate(prompts, sp, use_tqdm=False)
        assert_all_blocks_free(llm)
        llm.close()
    logprobs = [[next(iter(p.values())).logprob for p in out.prompt_logprobs[1:]] for out in outs]
    return attn, [out.outputs[0].token_ids for out in outs], logprobs, calls


def test_every_experiment_on_matches_none(tiny_qwen3, monkeypatch) -> None:
    _, none_tokens, none_logprobs, none_calls = _run(tiny_qwen3, monkeypatch, "")
    attn, tokens, logprobs, calls = _run(tiny_qwen3, monkeypatch, "all")
    assert attn.decode_fused_reduce  # (one split at these lengths: not taken)

    def taken(calls) -> set[str]:
        names = set()
        for name, kwargs, rows in calls:
            if kwargs.get("gated"):
                names.add("gated_mlp")
            elif name == "linear_add_rmsnorm":
                names.add("splitk_norm")
            elif kwargs.get("variant") == "tma":
                names.add("prefill_tma")
            elif name == "linear" and rows == vocab:
                names.add("lm_head_gemm")
            elif name == "decode_attention_rope":
                names.add("decode_fused_rope")
        return names

    vocab = TINY_QWEN3["vocab_size"]
    assert taken(none_calls) == set()
    assert taken(calls) == {
        "gated_mlp",
        "splitk_norm",
        "prefill_tma",
        "lm_head_gemm",
        "decode_fused_rope",  # the decode-only steps (<= 4 rows)
    }
    for got, expect in zip(logprobs, none_logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expect), atol=3e-2, rtol=3e-2)
    assert tokens == none_tokens


@pytest.fixture(autouse=True)
def _interpreter_only() -> None:
    if torch.cuda.is_available():
        pytest.skip("the interpreter's run of the fused paths; tests/gpu covers the GPU")
