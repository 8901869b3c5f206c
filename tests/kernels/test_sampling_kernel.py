"""The fused sampling kernel against the torch sampler (interpreter on the CPU).

Exact token equality where u sits well inside a token's CDF interval; with arbitrary u the kernel's
token must be the float64 inverse CDF's up to 1e-5 of mass at the boundary. Greedy rows are the
first argmax; zero-probability tokens are never drawn; stratified u over many identical rows
reproduces the probabilities to within one draw.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE
from minivllm.layers.sampler import SamplingTensors, sample_torch

DTYPES = [torch.float32, torch.float16]
# Several chunks with a ragged tail, and a single masked chunk.
BLOCKS = [256, 4096]


def _torch_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    u: torch.Tensor,
    top_k: torch.Tensor | None = None,
) -> torch.Tensor:
    s = logits.shape[0]
    if top_k is None:
        top_k = torch.zeros(s, dtype=torch.int32)
    st = SamplingTensors(
        temperature=temperature,
        top_k=top_k,
        top_p=torch.ones(s),
        min_p=torch.zeros(s),
        uniforms=u,
        all_greedy=False,
        any_top_k_or_p=False,
        any_min_p=False,
    )
    return sample_torch(logits, st)


def _kernel_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    u: torch.Tensor,
    top_k: torch.Tensor | None = None,
    block_v: int = 4096,
) -> torch.Tensor:
    from minivllm.kernels.sampling import sample_from_logits

    out = torch.full((logits.shape[0],), -1, dtype=torch.int64, device=DEVICE)
    got = sample_from_logits(
        logits.to(DEVICE),
        temperature.to(DEVICE),
        u.to(DEVICE),
        top_k.to(DEVICE) if top_k is not None else None,
        out=out,
        block_v=block_v,
    )
    assert got.data_ptr() == out.data_ptr()
    return got.cpu()


def _cdf64(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:  # [S, V] float64
    z = logits.double() / temperature.double().clamp_min(1e-30).unsqueeze(1)
    return z.softmax(dim=-1).cumsum(dim=-1)


def _logits(num_rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # A peaked distribution over a long flat tail, like a language model's.
    logits = 2 * torch.randn(num_rows, vocab, generator=gen)
    logits[:, :: vocab // 7] += 6
    return logits.to(dtype)


@pytest.mark.parametrize("block_v", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_when_u_inside_an_interval(dtype: torch.dtype, block_v: int) -> None:
    num_rows, vocab = 24, 1000
    logits = _logits(num_rows, vocab, dtype, seed=1)
    temperature = torch.tensor([0.5, 1.0, 2.0, 0.8] * 6)
    cdf = _cdf64(logits, temperature)
    probs = torch.diff(cdf, dim=-1, prepend=torch.zeros(num_rows, 1, dtype=torch.float64))
    # Per row a token with mass > 1e-3, and u at the middle of its CDF interval.
    gen = torch.Generator().manual_seed(2)
    wanted = torch.multinomial((probs > 1e-3).float(), 1, generator=gen).squeeze(1)
    rows = torch.arange(num_rows)
    u = (cdf[rows, wanted] - probs[rows, wanted] / 2).float()
    expect = _torch_sample(logits, temperature, u)
    got = _kernel_sample(logits, temperature, u, block_v=block_v)
    assert torch.equal(expect, wanted)
    assert torch.equal(got, wanted)


@pytest.mark.parametrize("block_v", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_u_matches_float64_inverse_cdf(dtype: torch.dtype, block_v: int) -> None:
    num_rows, vocab = 64, 777
    logits = _logits(num_rows, vocab, dtype, seed=3)
    temperature = torch.rand(num_rows, generator=torch.Generator().manual_seed(4)) * 2 + 0.1
    u = torch.rand(num_rows, generator=torch.Generator().manual_seed(5))
    got = _kernel_sample(logits, temperature, u, block_v=block_v)
    expect = _torch_sample(logits, temperature, u)
    cdf = _cdf64(logits, temperature)
    rows = torch.arange(num_rows)
    below = torch.where(
        got > 0, cdf[rows, (got - 1).clamp_min(0)], torch.zeros(num_rows, dtype=torch.float64)
    )
    # got is the float64 answer unless u is within 1e-5 of one end of its interval.
    assert (below - 1e-5 <= u.double()).all() and (u.double() < cdf[rows, got] + 1e-5).all()
    mismatch = got != expect
    assert int(mismatch.sum()) <= 2, (got[mismatch], expect[mismatch])


@pytest.mark.parametrize("block_v", BLOCKS)
def test_greedy_rows_are_first_argmax(block_v: int) -> None:
    num_rows, vocab = 8, 1000
    logits = _logits(num_rows, vocab, torch.float32, seed=6)
    logits[0, 10] = logits[0, 900] = 50.0  # tie across chunks: the first wins
    logits[1, 3] = logits[1, 4] = 50.0  # tie inside a chunk
    logits[2, vocab - 1] = 50.0  # the last entry of the ragged tail
    temperature = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.7, 1.0, 0.0])
    top_k = torch.tensor([0, 0, 0, 1, 0, 0, 1, 0], dtype=torch.int32)  # top_k 1 is greedy too
    u = torch.full((num_rows,), 0.999)
    greedy = (temperature == 0) | (top_k == 1)
    got = _kernel_sample(logits, temperature, u, top_k, block_v=block_v)
    expect = _torch_sample(logits, temperature, u, top_k)
    assert torch.equal(got[greedy], logits.argmax(dim=-1)[greedy])
    assert got[:3].tolist() == [10, 3, vocab - 1]
    assert torch.equal(got, expect)


@pytest.mark.parametrize("block_v", BLOCKS)
def test_zero_probability_tokens_never_drawn(block_v: int) -> None:
    vocab = 600
    logits = _logits(4, vocab, torch.float32, seed=7)
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[[5, 260, 261, 513]] = True  # the tail after 513 (and chunks in between) is -inf
    logits[:, ~allowed] = float("-inf")
    temperature = torch.ones(4)
    u = torch.tensor([0.0, 1.0 - 2**-24, 0.5, 1.0 - 2**-23])
    got = _kernel_sample(logits, temperature, u, block_v=block_v)
    expect = _torch_sample(logits, temperature, u)
    assert allowed[got].all(), got
    assert got[0] == 5 and got[1] == 513
    assert torch.equal(got, expect)


def test_stratified_u_reproduces_probabilities() -> None:
    num_rows, vocab = 384, 40
    row = _logits(1, vocab, torch.float32, seed=8)
    logits = row.expand(num_rows, vocab).contiguous()
    temperature = torch.full((num_rows,), 1.3)
    u = (torch.arange(num_rows, dtype=torch.float64) + 0.5) / num_rows
    got = _kernel_sample(logits, temperature, u.float(), block_v=32)
    counts = torch.bincount(got, minlength=vocab).double()
    probs = (row.double() / 1.3).softmax(dim=-1)[0]
    # Stratified draws hit each CDF interval floor or ceil(num_rows * p) times.
    assert (counts - num_rows * probs).abs().max() <= 1.0 + 1e-6, (counts, num_rows * probs)
