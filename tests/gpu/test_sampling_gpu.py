"""The fused sampling kernel on the GPU over Qwen3's full vocabulary (151936) for 256 rows of bf16
logits: against the torch sampler and float64 CDF intervals."""

from __future__ import annotations

import pytest
import torch
from minivllm.layers.sampler import Sampler, SamplingTensors, sample_torch

pytestmark = pytest.mark.gpu

T, VOCAB, DT = 256, 151936, torch.bfloat16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _sampling(temperature: torch.Tensor, u: torch.Tensor) -> SamplingTensors:
    s = temperature.shape[0]
    return SamplingTensors(
        temperature=temperature,
        top_k=torch.zeros(s, dtype=torch.int32, device="cuda"),
        top_p=torch.ones(s, device="cuda"),
        min_p=torch.zeros(s, device="cuda"),
        uniforms=u,
        all_greedy=False,
        any_top_k_or_p=False,
        any_min_p=False,
    )


def _vocab_logits() -> torch.Tensor:
    logits = 3 * torch.randn(T, VOCAB, generator=_gen(8), device="cuda")
    logits[:, ::9973] += 12  # a few peaks over a long tail
    return logits.to(DT)


def test_sampling_bf16_full_vocab() -> None:
    logits = _vocab_logits()
    temperature = torch.rand(T, generator=_gen(9), device="cuda") * 1.5 + 0.2
    temperature[::8] = 0.0
    u = torch.rand(T, generator=_gen(10), device="cuda")
    st = _sampling(temperature, u)
    got = Sampler(fused=True)(logits, st)  # CUDA, no filters: the fused kernel
    expect = sample_torch(logits, st)
    greedy = temperature == 0
    assert torch.equal(got[greedy], logits.float().argmax(dim=-1)[greedy])
    # Against float64: the drawn token's CDF interval holds u, up to 1e-5 of mass.
    z = logits.double() / torch.where(greedy, 1.0, temperature).double().unsqueeze(1)
    cdf = z.softmax(dim=-1).cumsum(dim=-1)
    rows = torch.arange(T, device="cuda")
    below = torch.where(got > 0, cdf[rows, (got - 1).clamp_min(0)], 0.0)
    ok = (below - 1e-5 <= u.double()) & (u.double() < cdf[rows, got] + 1e-5)
    assert ok[~greedy].all()
    assert (got != expect).sum().item() <= 3


def test_sampling_exact_inside_intervals() -> None:
    logits = _vocab_logits()
    temperature = torch.full((T,), 0.9, device="cuda")
    probs = (logits.double() / 0.9).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    wanted = torch.multinomial((probs > 1e-3).float(), 1, generator=_gen(11)).squeeze(1)
    rows = torch.arange(T, device="cuda")
    u = (cdf[rows, wanted] - probs[rows, wanted] / 2).float()
    st = _sampling(temperature, u)
    assert torch.equal(Sampler(fused=True)(logits, st), wanted)
    assert torch.equal(sample_torch(logits, st), wanted)
