"""Differential tests: the C++ core against its Python twin, step by step, on random traces.

Both schedulers get the same requests, aborts and sampled tokens. After every call their outputs
must be identical (every Batch array: dtype, shape and values; every update result; the same
exceptions), their whole internal state (debug_state) must be identical, and every invariant of
DESIGN.md must hold in both. At the end of a trace every request is driven to completion and every
block must be free again.
"""

from __future__ import annotations

from typing import Any

import pytest
from core_traces import Config, Trace
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@st.composite
def configs(draw: Any) -> Config:
    block_size = draw(st.sampled_from([1, 2, 3, 4, 16, 256]))
    max_len_cap = {1: 24, 2: 32, 3: 40, 4: 48, 16: 160, 256: 1100}[block_size]
    max_model_len = draw(st.integers(2, max_len_cap))
    need = -(-(max_model_len - 1) // block_size)
    num_blocks = max(1, need + draw(st.integers(-1, 6)))
    max_num_seqs = draw(st.integers(1, 8))
    budget_cap = max(2 * block_size, 24)
    max_num_batched_tokens = max_num_seqs + draw(st.integers(0, budget_cap))
    prefix = draw(st.sampled_from([True, True, True, False]))
    return Config(
        num_blocks,
        block_size,
        max_num_seqs,
        max_num_batched_tokens,
        max_model_len,
        prefix,
        draw(st.booleans()),
    )


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), seed=st.integers(0, 2**32 - 1))
def test_cpp_matches_twin_on_random_traces(cfg: Config, seed: int) -> None:
    Trace(cfg, seed).run(num_steps=40)


SOAK_CONFIGS = [
    # (num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_model_len, prefix)
    Config(12, 1, 4, 8, 12, True),  # block size 1, tiny pool: constant preemption
    Config(6, 4, 4, 6, 24, True),  # small budget: chunking
    Config(5, 16, 6, 24, 64, True),
    Config(8, 16, 8, 40, 100, False),
    Config(3, 256, 4, 300, 700, True),  # block size 256
    Config(5, 256, 8, 520, 1024, True),
    Config(9, 2, 3, 5, 16, True),
    Config(12, 1, 4, 8, 12, True, async_scheduling=True),
    Config(5, 16, 6, 24, 64, True, async_scheduling=True),
    Config(8, 16, 8, 40, 100, False, async_scheduling=True),
    Config(5, 256, 8, 520, 1024, True, async_scheduling=True),
]


@pytest.mark.parametrize(
    "cfg",
    SOAK_CONFIGS,
    ids=[f"bs{c.block_size}-nb{c.num_blocks}{'-async' * c.async_scheduling}" for c in SOAK_CONFIGS],
)
def test_cpp_matches_twin_soak(cfg: Config) -> None:
    num_seeds = 2 if cfg.block_size >= 256 else 4  # long prompts make the twin slow
    steps = sum(Trace(cfg, seed).run(num_steps=150) for seed in range(num_seeds))
    assert steps >= 200 * num_seeds, steps  # thousands of steps over all the configs


def test_traces_exercise_preemption_prefix_hits_and_chunking() -> None:
    """The soak workloads really reach the interesting paths (or the test above proves little)."""
    stats = {"num_preemptions": 0, "prefix_cache_hits": 0}
    chunked = 0
    for cfg in SOAK_CONFIGS[:3]:
        trace = Trace(cfg, seed=1)
        for _ in range(150):
            trace.step()
        for k in stats:
            stats[k] += trace.py.stats[k]
        chunked += cfg.max_num_batched_tokens < cfg.max_model_len
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0 and chunked > 0


def test_async_traces_exercise_placeholders_and_preemption() -> None:
    placeholders = preemptions = hits = 0
    for cfg in [c for c in SOAK_CONFIGS if c.async_scheduling][:3]:
        trace = Trace(cfg, seed=1)
        for _ in range(150):
            trace.step()
        placeholders += trace.num_placeholder_inputs
        preemptions += trace.py.stats["num_preemptions"]
        hits += trace.py.stats["prefix_cache_hits"]
    assert placeholders > 100 and preemptions > 0 and hits > 0, (placeholders, preemptions, hits)
