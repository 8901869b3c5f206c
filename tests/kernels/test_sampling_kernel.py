"""The fused sampling kernels against the torch sampler (interpreter on the CPU).

Exact token equality where u sits well inside a token's CDF interval; with arbitrary u the kernel's
token must be the float64 inverse CDF's up to 1e-5 of mass at the boundary. Greedy rows are the
first argmax; zero-probability tokens are never drawn; stratified u over many identical rows
reproduces the probabilities to within one draw. The vocabulary is split into chunks: ragged and
single-chunk vocabularies, argmax ties across chunk boundaries, all the mass in the last chunk, a
chunk of -inf logits, and greedy rows mixed with sampling rows, each with a small chunk size.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE
from minivllm.layers.sampler import SamplingTensors, sample_torch

DTYPES = [torch.float32, torch.float16]
# Several chunks with a ragged tail, and a single masked chunk.
CHUNKS = [256, 4096]
CHUNK = 64  # the chunk-boundary tests: small vocabularies, several chunks


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
    chunk_size: int = 4096,
) -> torch.Tensor:
    from minivllm.kernels.sampling import sample_from_logits

    out = torch.full((logits.shape[0],), -1, dtype=torch.int64, device=DEVICE)
    got = sample_from_logits(
        logits.to(DEVICE),
        temperature.to(DEVICE),
        u.to(DEVICE),
        top_k.to(DEVICE) if top_k is not None else None,
        out=out,
        chunk_size=chunk_size,
    )
    assert got.data_ptr() == out.data_ptr()
    return got.cpu()


def _cdf64(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:  # [S, V] float64
    z = logits.double() / temperature.double().clamp_min(1e-30).unsqueeze(1)
    return z.softmax(dim=-1).cumsum(dim=-1)


def _u_inside_intervals(
    logits: torch.Tensor, temperature: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:  # u [S] float32, wanted [S] int64
    """Per row a token with mass > 1e-3 (temperature 0 read as 1), and u at the middle of its CDF
    interval: any correct inverse CDF draws exactly that token."""
    cdf = _cdf64(logits, torch.where(temperature > 0, temperature, 1.0))
    probs = torch.diff(cdf, dim=-1, prepend=torch.zeros(logits.shape[0], 1, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    wanted = torch.multinomial((probs > 1e-3).float(), 1, generator=gen).squeeze(1)
    rows = torch.arange(logits.shape[0])
    return (cdf[rows, wanted] - probs[rows, wanted] / 2).float(), wanted


def _logits(num_rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # A peaked distribution over a long flat tail, like a language model's.
    logits = 2 * torch.randn(num_rows, vocab, generator=gen)
    logits[:, :: vocab // 7] += 6
    return logits.to(dtype)


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_when_u_inside_an_interval(dtype: torch.dtype, chunk_size: int) -> None:
    num_rows, vocab = 24, 1000
    logits = _logits(num_rows, vocab, dtype, seed=1)
    temperature = torch.tensor([0.5, 1.0, 2.0, 0.8] * 6)
    u, wanted = _u_inside_intervals(logits, temperature, seed=2)
    expect = _torch_sample(logits, temperature, u)
    got = _kernel_sample(logits, temperature, u, chunk_size=chunk_size)
    assert torch.equal(expect, wanted)
    assert torch.equal(got, wanted)


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_u_matches_float64_inverse_cdf(dtype: torch.dtype, chunk_size: int) -> None:
    num_rows, vocab = 64, 777
    logits = _logits(num_rows, vocab, dtype, seed=3)
    temperature = torch.rand(num_rows, generator=torch.Generator().manual_seed(4)) * 2 + 0.1
    u = torch.rand(num_rows, generator=torch.Generator().manual_seed(5))
    got = _kernel_sample(logits, temperature, u, chunk_size=chunk_size)
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


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_greedy_rows_are_first_argmax(chunk_size: int) -> None:
    num_rows, vocab = 8, 1000
    logits = _logits(num_rows, vocab, torch.float32, seed=6)
    logits[0, 10] = logits[0, 900] = 50.0  # tie across chunks: the first wins
    logits[1, 3] = logits[1, 4] = 50.0  # tie inside a chunk
    logits[2, vocab - 1] = 50.0  # the last entry of the ragged tail
    temperature = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.7, 1.0, 0.0])
    top_k = torch.tensor([0, 0, 0, 1, 0, 0, 1, 0], dtype=torch.int32)  # top_k 1 is greedy too
    u = torch.full((num_rows,), 0.999)
    greedy = (temperature == 0) | (top_k == 1)
    got = _kernel_sample(logits, temperature, u, top_k, chunk_size=chunk_size)
    expect = _torch_sample(logits, temperature, u, top_k)
    assert torch.equal(got[greedy], logits.argmax(dim=-1)[greedy])
    assert got[:3].tolist() == [10, 3, vocab - 1]
    assert torch.equal(got, expect)


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_zero_probability_tokens_never_drawn(chunk_size: int) -> None:
    vocab = 600
    logits = _logits(4, vocab, torch.float32, seed=7)
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[[5, 260, 261, 513]] = True  # the tail after 513 (and chunks in between) is -inf
    logits[:, ~allowed] = float("-inf")
    temperature = torch.ones(4)
    u = torch.tensor([0.0, 1.0 - 2**-24, 0.5, 1.0 - 2**-23])
    got = _kernel_sample(logits, temperature, u, chunk_size=chunk_size)
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
    got = _kernel_sample(logits, temperature, u.float(), chunk_size=32)
    counts = torch.bincount(got, minlength=vocab).double()
    probs = (row.double() / 1.3).softmax(dim=-1)[0]
    # Stratified draws hit each CDF interval floor or ceil(num_rows * p) times.
    assert (counts - num_rows * probs).abs().max() <= 1.0 + 1e-6, (counts, num_rows * probs)


@pytest.mark.parametrize("vocab", [40, CHUNK, 2 * CHUNK, 3 * CHUNK + 17])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_not_a_multiple_of_the_chunk(dtype: torch.dtype, vocab: int) -> None:
    """Smaller than one chunk, exactly one, an exact multiple, a ragged tail."""
    num_rows = 8
    logits = _logits(num_rows, vocab, dtype, seed=10)
    logits[0, vocab - 1] = 40.0  # a greedy row whose max is the very last entry
    temperature = torch.tensor([0.0, 0.6, 1.0, 1.7, 0.0, 0.9, 1.2, 3.0])
    u, wanted = _u_inside_intervals(logits, temperature, seed=11)
    greedy = temperature == 0
    wanted[greedy] = logits.float().argmax(dim=-1)[greedy]
    got = _kernel_sample(logits, temperature, u, chunk_size=CHUNK)
    assert got[0] == vocab - 1
    assert torch.equal(got, wanted)
    assert torch.equal(_torch_sample(logits, temperature, u), wanted)


def test_greedy_ties_across_chunk_boundaries() -> None:
    vocab = 4 * CHUNK + 44  # the last chunk is ragged
    logits = _logits(6, vocab, torch.float32, seed=12)
    for row, tied in enumerate(
        [
            [CHUNK - 1, CHUNK],  # the two sides of a boundary
            [3 * CHUNK + 2, 2 * CHUNK + 5, CHUNK + 7],  # written last chunk first
            [4 * CHUNK, vocab - 1],  # the first and last entries of the ragged chunk
            [0, 2 * CHUNK],
            [CHUNK + 36, 3 * CHUNK + 63],  # top_k 1 at temperature 0.7: still the raw logits
        ]
    ):
        logits[row, tied] = 30.0
    logits[5] = 1.5  # one value everywhere: index 0
    temperature = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.7, 0.0])
    top_k = torch.tensor([0, 0, 0, 0, 1, 0], dtype=torch.int32)
    u = torch.full((6,), 0.5)
    got = _kernel_sample(logits, temperature, u, top_k, chunk_size=CHUNK)
    assert got.tolist() == [CHUNK - 1, CHUNK + 7, 4 * CHUNK, 0, CHUNK + 36, 0]
    assert torch.equal(got, logits.argmax(dim=-1))


def test_all_mass_in_the_last_chunk() -> None:
    vocab = 3 * CHUNK + 10
    allowed = [3 * CHUNK + 1, 3 * CHUNK + 5, vocab - 1]
    logits = torch.full((5, vocab), float("-inf"))
    logits[:, allowed] = torch.tensor([1.0, 2.0, 0.5])
    logits[4, : 3 * CHUNK] = -300.0  # finite, but exp underflows to 0 against the max
    temperature = torch.tensor([1.0, 1.0, 0.5, 2.0, 1.0])
    u = torch.tensor([0.0, 0.3, 0.7, 1.0 - 2**-24, 0.0])
    got = _kernel_sample(logits, temperature, u, chunk_size=CHUNK)
    assert torch.isin(got, torch.tensor(allowed)).all(), got
    assert got[0] == allowed[0] and got[3] == allowed[2] and got[4] == allowed[0]
    assert torch.equal(got, _torch_sample(logits, temperature, u))


def test_chunk_of_minus_inf_logits() -> None:
    """Chunk 1 is -inf in every row, chunk 0 too in the last two; draws on both sides of it."""
    num_rows, vocab = 12, 4 * CHUNK
    logits = _logits(num_rows, vocab, torch.float32, seed=13)
    logits[:, CHUNK : 2 * CHUNK] = float("-inf")
    logits[-2:, :CHUNK] = float("-inf")
    logits[:, [CHUNK - 1, 2 * CHUNK]] = 4.0  # heavy tokens next to the -inf chunk
    temperature = torch.tensor([1.0, 0.8, 1.5, 0.0] * 3)
    u, wanted = _u_inside_intervals(logits, temperature, seed=14)
    greedy = temperature == 0
    wanted[greedy] = logits.argmax(dim=-1)[greedy]
    got = _kernel_sample(logits, temperature, u, chunk_size=CHUNK)
    assert torch.equal(got, wanted)
    assert ((got < CHUNK) | (got >= 2 * CHUNK)).all() and (got[-2:] >= 2 * CHUNK).all()
    # Stratified u over one row never lands in the -inf chunk.
    u = (torch.arange(num_rows) + 0.5) / num_rows
    row = logits[:1].expand(num_rows, vocab).contiguous()
    got = _kernel_sample(row, torch.ones(num_rows), u, chunk_size=CHUNK)
    assert ((got < CHUNK) | (got >= 2 * CHUNK)).all(), got


def test_u_at_one_takes_the_last_positive_token() -> None:
    """u = 1 puts the target at the total, past every prefix: the rounding guards' case."""
    vocab = 4 * CHUNK + 10
    logits = _logits(4, vocab, torch.float32, seed=17)
    last = [2 * CHUNK + 20, vocab - 1, CHUNK - 1, 3 * CHUNK + 5]
    for row, i in enumerate(last):
        logits[row, i] = 12.0  # heavy: rounding of the other sums cannot skip it
        logits[row, i + 1 :] = float("-inf")
    logits[3, 2 * CHUNK : 3 * CHUNK] = float("-inf")
    u = torch.ones(4)
    got = _kernel_sample(logits, torch.tensor([1.0, 0.5, 2.0, 1.0]), u, chunk_size=CHUNK)
    assert got.tolist() == last


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_greedy_and_sampling_rows(dtype: torch.dtype) -> None:
    num_rows, vocab = 16, 5 * CHUNK + 3
    logits = _logits(num_rows, vocab, dtype, seed=15)
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3] * 4)
    # top_k 1 is greedy at any temperature; other values reaching the kernel are not applied.
    top_k = torch.tensor([0, 0, 1, 0, 0, 5, 0, 1, 0, 0, 0, 0, 1, 0, 0, 40], dtype=torch.int32)
    u, wanted = _u_inside_intervals(logits, temperature, seed=16)
    greedy = (temperature == 0) | (top_k == 1)
    wanted[greedy] = logits.float().argmax(dim=-1)[greedy]
    got = _kernel_sample(logits, temperature, u, top_k, chunk_size=CHUNK)
    assert torch.equal(got, wanted)
    assert torch.equal(_torch_sample(logits, temperature, u, top_k), wanted)
