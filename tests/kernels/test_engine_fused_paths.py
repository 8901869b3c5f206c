"""The engine with every layer on its fused Triton path (as on a GPU), on the CPU interpreter: a
float16 model gives the same greedy tokens as with the plain torch layers, and prompt logprobs
within float16 rounding; the decode steps (<= GATED_MAX_TOKENS rows) run gate/up's GEMM with
SiLU-and-multiply in its epilogue. tests/gpu runs the same paths in bf16 with CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import assert_all_blocks_free, make_llm, mixed_prompts
from minivllm import SamplingParams

# The opt-in routes' switches (layers.linear, layers.attention), each off by default.
SWITCHES = {
    "linear": ("NORM_IN_GEMM_MAX_TOKENS", "ROPE_IN_GEMM_MAX_TOKENS", "L2_PREFETCH_MAX_TOKENS"),
    "attention": ("DECODE_EARLY_LOADS", "MERGE_SPLITS_IN_O_PROJ"),
}


def _run(path, monkeypatch, fused: bool, switches: tuple[str, ...] = (), max_len: int = 30):
    import minivllm.layers
    from minivllm.kernels import linear
    from minivllm.layers import attention
    from minivllm.layers import linear as linear_layers

    with monkeypatch.context() as mp:
        mp.setattr(minivllm.layers, "fused_kernels_on", lambda device: fused)
        for name in SWITCHES["linear"]:
            mp.setattr(linear_layers, name, 64 if name in switches else 0)
        for name in SWITCHES["attention"]:
            mp.setattr(attention, name, name in switches)
        gated_rows: list[int] = []
        original = linear.linear

        def spy(x, weight, *args, **kwargs):
            if kwargs.get("gated"):
                gated_rows.append(x.shape[0])
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
    return [out.outputs[0].token_ids for out in outs], logprobs, gated_rows


def test_fused_layers_match_the_plain_ones(tiny_qwen3, monkeypatch) -> None:
    from minivllm.layers.linear import GATED_MAX_TOKENS

    plain_tokens, plain_logprobs, plain_gated = _run(tiny_qwen3, monkeypatch, fused=False)
    tokens, logprobs, gated = _run(tiny_qwen3, monkeypatch, fused=True)
    assert plain_gated == []
    assert gated and max(gated) <= GATED_MAX_TOKENS  # decode steps only
    for got, expect in zip(logprobs, plain_logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expect), atol=3e-2, rtol=3e-2)
    assert tokens == plain_tokens


@pytest.mark.parametrize(
    ("switches", "taken"),
    [
        (SWITCHES["linear"] + SWITCHES["attention"], ("add", "rope", "merge_add")),
        (("MERGE_SPLITS_IN_O_PROJ", "DECODE_EARLY_LOADS"), ("merge",)),
    ],
    ids=["all", "merge-only"],
)
def test_the_opt_in_routes_match_the_fused_layers(gpu_qwen3, monkeypatch, switches, taken):
    """The opt-in routes in the engine (NORM_IN_GEMM_MAX_TOKENS and ROPE_IN_GEMM_MAX_TOKENS: no
    norm and no rotary kernels, the GEMMs do them; MERGE_SPLITS_IN_O_PROJ: no decode reduce,
    o_proj merges the splits, adding the residual too when the norm is in the GEMMs;
    DECODE_EARLY_LOADS; L2_PREFETCH_MAX_TOKENS, a no-op off a GPU), all at once and the split
    merge alone, on a head_dim 64 model so the qkv GEMM's tiles hold whole heads: the same
    greedy tokens as the default fused layers, prompt logprobs within float16 rounding, and
    each route taken."""
    from minivllm.kernels import linear, merge_linear, qkv_rope

    calls = dict.fromkeys(("add", "rope", "merge", "merge_add"), 0)

    def counting(module, name, key):
        original = getattr(module, name)

        def spy(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    # Contexts past 256 tokens: the decode runs two splits (what o_proj merges).
    expect_tokens, expect_logprobs, _ = _run(gpu_qwen3, monkeypatch, fused=True, max_len=300)
    counting(linear, "linear_add_residual", "add")
    counting(qkv_rope, "qkv_rope_store_kv", "rope")
    counting(merge_linear, "merge_linear", "merge")
    counting(merge_linear, "merge_linear_add_residual", "merge_add")
    tokens, logprobs, _ = _run(gpu_qwen3, monkeypatch, True, switches, max_len=300)
    assert {key for key, n in calls.items() if n} == set(taken), calls
    for got, expect in zip(logprobs, expect_logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expect), atol=3e-2, rtol=3e-2)
    assert tokens == expect_tokens


@pytest.fixture(autouse=True)
def _interpreter_only() -> None:
    if torch.cuda.is_available():
        pytest.skip("the interpreter's run of the fused paths; tests/gpu covers the GPU")
