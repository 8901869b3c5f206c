"""The split-K GEMM with the residual add + RMSNorm folded in (kernels/linear_norm.py, the
"splitk_norm" experiment) on the GPU at Qwen3-0.6B sizes (hidden 1024; o_proj K = 2048,
down_proj K = 3072) in bf16, against the two kernels it replaces (`linear(partials=True)` +
`fused_add_rmsnorm`); repeated, chained and replayed in a CUDA graph, which is where a missing
release / acquire or a counter left non-zero would show; and the layers that hand it over."""

from __future__ import annotations

import pytest
import torch
from minivllm.layers.linear import DeferredLinear, RowParallelLinear, SplitKPartials
from minivllm.layers.rmsnorm import RMSNorm

pytestmark = pytest.mark.gpu

HIDDEN, DT, EPS = 1024, torch.bfloat16, 1e-6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _operands(m: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    x = torch.randn(m, k, generator=_gen(seed), device="cuda").to(DT)
    w = (0.02 * torch.randn(HIDDEN, k, generator=_gen(seed + 1), device="cuda")).to(DT)
    residual = torch.randn(m, HIDDEN, generator=_gen(seed + 2), device="cuda").to(DT)
    norm_weight = (torch.rand(HIDDEN, generator=_gen(seed + 3), device="cuda") + 0.5).to(DT)
    return x, w, residual, norm_weight


def _two_kernels(x, w, residual, norm_weight) -> tuple[torch.Tensor, torch.Tensor]:
    from minivllm.kernels.fused_norm import fused_add_rmsnorm
    from minivllm.kernels.linear import linear

    return fused_add_rmsnorm(linear(x, w, partials=True), residual, norm_weight, EPS)


def _assert_matches(got: tuple, expect: tuple) -> None:
    """The new residual bit for bit; the output to a bf16 ulp on a few elements (a row's sum of
    squares is added up in another order)."""
    (out, new_residual), (expect_out, expect_residual) = got, expect
    assert torch.equal(new_residual, expect_residual)
    torch.testing.assert_close(out, expect_out, atol=1e-2, rtol=1e-2)
    assert (out == expect_out).float().mean().item() > 0.99


def _counters_are_zero() -> bool:
    from minivllm.kernels.linear_norm import _counters

    return bool((_counters(torch.device("cuda", torch.cuda.current_device())) == 0).all())


@pytest.mark.parametrize("rows", [1, 8, 16, 33, 64, 100, 200, 256])
@pytest.mark.parametrize("k", [2048, 3072])
def test_linear_add_rmsnorm_bf16(rows: int, k: int) -> None:
    """Every size the split-K GEMM takes (the layers fold the norm in up to MAX_TOKENS; the
    benchmark times all of them); 50 calls in a row give the same bits, and leave the counters
    at zero."""
    from minivllm.kernels.linear_norm import linear_add_rmsnorm

    x, w, residual, norm_weight = _operands(rows, k, seed=rows + k)
    got = linear_add_rmsnorm(x, w, residual, norm_weight, EPS)
    _assert_matches(got, _two_kernels(x, w, residual, norm_weight))
    for _ in range(50):
        again = linear_add_rmsnorm(x, w, residual, norm_weight, EPS)
        assert torch.equal(again[0], got[0]) and torch.equal(again[1], got[1])
    torch.cuda.synchronize()
    assert _counters_are_zero()


@pytest.mark.parametrize("rows", [1, 16, 48])
def test_replays_in_a_cuda_graph(rows: int) -> None:
    """o_proj -> post-attention norm, then down_proj -> next input norm on the new residual: two
    folded kernels back to back on the same counters (PDL on: the second's programs start while
    the first runs), captured once and replayed with new inputs twice; each replay equals the
    two-kernel path run eagerly."""
    from minivllm.kernels.linear_norm import linear_add_rmsnorm

    attn, w_o, residual, norm_o = _operands(rows, 2048, seed=1)
    act, w_down, _, norm_down = _operands(rows, 3072, seed=5)

    def fill(seed: int) -> None:
        for t in (attn, act, residual):
            t.copy_(torch.randn(t.shape, generator=_gen(seed), device="cuda").to(DT))
            seed += 1

    def folded() -> list[torch.Tensor]:
        h, r = linear_add_rmsnorm(attn, w_o, residual, norm_o, EPS)
        out, r2 = linear_add_rmsnorm(act, w_down, r, norm_down, EPS)
        return [h, r, out, r2]

    def reference() -> list[torch.Tensor]:
        h, r = _two_kernels(attn, w_o, residual, norm_o)
        out, r2 = _two_kernels(act, w_down, r, norm_down)
        return [h, r, out, r2]

    fill(10)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        folded()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = folded()
    for seed in (20, 30):
        fill(seed)
        graph.replay()
        torch.cuda.synchronize()
        expect = reference()  # the new residual is the same bits, so the second's inputs too
        _assert_matches((static_out[0], static_out[1]), (expect[0], expect[1]))
        _assert_matches((static_out[2], static_out[3]), (expect[2], expect[3]))
        assert _counters_are_zero()


@pytest.mark.parametrize("rows", [1, 64, 65])
def test_row_parallel_layer_defers_to_the_norm_bf16(rows: int, monkeypatch) -> None:
    """With "splitk_norm", o_proj / down_proj up to MAX_TOKENS rows return DeferredLinear and the
    RMSNorm runs the folded kernel; past it, SplitKPartials as by default. Either way the
    results match the default layers'."""
    monkeypatch.delenv("MINIVLLM_EXPERIMENTS", raising=False)
    with torch.device("cuda"):
        proj = RowParallelLinear(3072, HIDDEN).to(dtype=DT)
        norm = RMSNorm(HIDDEN, eps=EPS).to(dtype=DT)
    monkeypatch.setenv("MINIVLLM_EXPERIMENTS", "splitk_norm")
    with torch.device("cuda"):
        folded = RowParallelLinear(3072, HIDDEN).to(dtype=DT)
    x, w, residual, norm_weight = _operands(rows, 3072, seed=40)
    proj.weight.copy_(w)
    folded.weight.copy_(w)
    norm.weight.copy_(norm_weight)
    y, y_folded = proj(x, partials=True), folded(x, partials=True)
    assert isinstance(y, SplitKPartials)
    assert isinstance(y_folded, DeferredLinear if rows <= 64 else SplitKPartials)
    _assert_matches(norm(y_folded, residual), norm(y, residual))


def test_engine_greedy_with_the_experiment_bf16(gpu_qwen3, monkeypatch) -> None:
    """The engine in bf16 with CUDA graphs: decode steps (up to 16 rows) fold every o / down
    norm in, steps with prefill (past 64 tokens) keep the two kernels. Greedy outputs equal the
    default engine's: only a row's sum of squares is added up in another order."""
    from engine_fixtures import mixed_prompts
    from minivllm import LLM, SamplingParams

    prompts = mixed_prompts(12, seed=70, min_len=3, max_len=60)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    out = {}
    for experiments in ("", "splitk_norm"):
        monkeypatch.setenv("MINIVLLM_EXPERIMENTS", experiments)
        with LLM(
            str(gpu_qwen3),
            device="cuda",
            dtype="bfloat16",
            max_model_len=256,
            max_num_seqs=16,
            max_num_batched_tokens=256,
            num_kv_blocks=128,
        ) as llm:
            model = llm.model_runner.model
            rows = [m for m in model.modules() if isinstance(m, RowParallelLinear)]
            assert rows and all((m.norm_gemm is not None) == bool(experiments) for m in rows)
            res = llm.generate(prompts, params, use_tqdm=False)
            out[experiments] = [o.outputs[0].token_ids for o in res]
    assert out["splitk_norm"] == out[""]
