"""Helpers of the scheduler unit tests (test_core_scheduling_rules.py,
test_core_scheduler_inputs.py, test_core_sampling_and_async.py): a checked step, a run to the end,
and an exact comparison of a Batch's arrays, dtype included."""

from __future__ import annotations

from typing import Any

import numpy as np
from test_core_invariants import check_invariants

I32, I64 = np.int32, np.int64


def step(sched: Any, tokens: list[int] | None = None) -> tuple[Any, list]:
    """schedule() + update() with the given tokens (default 100, 101, ...); checks invariants."""
    batch = sched.schedule()
    assert batch is not None
    num_sampled = len(batch.sample_seq_ids)
    if tokens is None:
        tokens = list(range(100, 100 + num_sampled))
    check_invariants(sched)
    finished = sched.update(np.array(tokens, dtype=I64))
    check_invariants(sched)
    return batch, finished


def run_to_end(sched: Any, token: int = 100, max_steps: int = 10_000) -> list:
    finished = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return finished
        batch = sched.schedule()
        finished += sched.update(np.full(len(batch.sample_seq_ids), token, dtype=I64))
        check_invariants(sched)
    raise AssertionError("did not finish")


def assert_array(a: np.ndarray, expected: Any, dtype: Any) -> None:
    assert isinstance(a, np.ndarray) and a.dtype == dtype, (type(a), getattr(a, "dtype", None))
    np.testing.assert_array_equal(a, np.asarray(expected, dtype=dtype))
    assert a.shape == np.asarray(expected).shape
