"""Hostile values at the Python boundary of the core, tried on the C++ core and its twin alike.

Every value that Python can pass and the core cannot hold (ints past int64, floats that float32
rounds to infinity or zero, ids outside the vocabulary) is refused with a ValueError that names
it, and a wrong type with a TypeError; either way nothing changes. The tables below are the
inputs; the staging-layout ones are in test_core_staging.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_core_invariants import IMPLS, check_invariants

pytestmark = pytest.mark.parametrize("Scheduler", IMPLS)

ARGS = (16, 4, 4, 64, 64)  # num_blocks, block_size, max_num_seqs, max_num_batched_tokens, mml
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_INF_EDGE = 3.4028235677973366e38  # halfway between float32's max and 2**128: rounds up

# (add_request arguments that replace the defaults, exception, message pattern)
HOSTILE_REQUESTS = [
    ({"seq_id": 2**63}, ValueError, "seq_id 9223372036854775808 does not fit int64"),
    ({"seq_id": -(2**63) - 1}, ValueError, "seq_id -9223372036854775809 does not fit int64"),
    ({"seq_id": 2**200}, ValueError, "seq_id .* does not fit int64"),
    ({"max_tokens": 2**63}, ValueError, "max_tokens 9223372036854775808 does not fit int64"),
    ({"max_tokens": -(2**64)}, ValueError, "max_tokens .* does not fit int64"),
    ({"top_k": 2**70}, ValueError, "top_k 1180591620717411303424 does not fit int64"),
    ({"top_k": 2**31}, ValueError, "top_k must be in \\[0, 2\\*\\*31 - 1\\]"),
    ({"vocab_size": 2**63}, ValueError, "vocab_size .* does not fit int64"),
    ({"vocab_size": -(2**64)}, ValueError, "vocab_size .* does not fit int64"),
    ({"seed": 2**64}, ValueError, "seed must be in \\[0, 2\\*\\*64\\)"),
    ({"seed": -1}, ValueError, "seed must be in"),
    ({"prompt_token_ids": [1, 2**64]}, ValueError, "prompt token id 18446744073709551616"),
    ({"prompt_token_ids": [1, -(2**63) - 1]}, ValueError, "prompt token id .* int64"),
    ({"prompt_token_ids": np.array([1, 2**63], np.uint64)}, ValueError, "9223372036854775808"),
    ({"eos_token_ids": [2**63]}, ValueError, "eos token id 9223372036854775808"),
    ({"stop_token_ids": np.array([2**64 - 1], np.uint64)}, ValueError, "stop token id"),
    ({"eos_token_ids": np.array([[1]])}, ValueError, "eos_token_ids must be a 1-D integer"),
    ({"stop_token_ids": np.array([0.5])}, ValueError, "stop_token_ids must be a 1-D integer"),
    ({"temperature": 2**1024}, ValueError, "temperature .* does not fit a float"),
    ({"top_p": 10**400}, ValueError, "top_p .* does not fit a float"),
    ({"min_p": -(2**1024)}, ValueError, "min_p .* does not fit a float"),
    ({"temperature": FLOAT32_INF_EDGE}, ValueError, "temperature must be finite"),
    ({"temperature": 1e39}, ValueError, "temperature must be finite"),
    ({"temperature": 1e300}, ValueError, "temperature must be finite"),
    ({"top_p": 1e-50}, ValueError, "top_p must be in \\(0, 1\\]"),
    ({"top_p": 1.0000001}, ValueError, "top_p must be in"),
    ({"min_p": float("nan")}, ValueError, "min_p must be in"),
    ({"seq_id": "1"}, TypeError, "seq_id must be an int"),
    ({"max_tokens": 2.0}, TypeError, "max_tokens must be an int"),
    ({"top_k": None}, TypeError, "top_k must be an int"),
    ({"vocab_size": 1.5}, TypeError, "vocab_size must be an int"),
    ({"seed": "7"}, TypeError, "seed must be an int"),
    ({"temperature": "0.5"}, TypeError, "temperature must be a float"),
    ({"top_p": None}, TypeError, "top_p must be a float"),
    ({"min_p": [0.1]}, TypeError, "min_p must be a float"),
    ({"prompt_token_ids": [1, None]}, TypeError, "prompt token id must be an int"),
    ({"eos_token_ids": 3}, TypeError, "not iterable"),
]


@pytest.mark.parametrize(
    "kwargs, error, match", HOSTILE_REQUESTS, ids=[str(k) for k, _, _ in HOSTILE_REQUESTS]
)
def test_hostile_requests_are_refused(
    Scheduler: Any, kwargs: dict, error: type, match: str
) -> None:
    sched = Scheduler(*ARGS)
    args = {"seq_id": 0, "prompt_token_ids": [1, 2, 3], "max_tokens": 2, **kwargs}
    with pytest.raises(error, match=match):
        sched.add_request(**args)
    assert not sched.has_unfinished()
    check_invariants(sched)


# add_request arguments at the edges of what fits; each is accepted
EDGE_REQUESTS = [
    {"seq_id": 2**63 - 1},
    {"seq_id": -(2**63)},
    {"max_tokens": 2**63 - 1},
    {"top_k": 2**31 - 1},
    {"seed": 2**64 - 1},
    {"vocab_size": 2**63 - 1},
    {"temperature": FLOAT32_MAX},
    {"temperature": 3.4028235e38},  # above float32's max, rounds down to it
    {"temperature": 1e-50},  # rounds to 0: greedy
    {"top_p": 1.5e-45},  # the smallest float32 above 0
    {"min_p": 1e-50},
    {"prompt_token_ids": np.array([1, 2**31 - 1], np.uint64)},
    {"eos_token_ids": [-(2**63), 2**63 - 1]},
]


@pytest.mark.parametrize("kwargs", EDGE_REQUESTS, ids=[str(k) for k in EDGE_REQUESTS])
def test_edge_requests_are_accepted(Scheduler: Any, kwargs: dict) -> None:
    sched = Scheduler(*ARGS)
    sched.add_request(**{"seq_id": 0, "prompt_token_ids": [1, 2, 3], "max_tokens": 2, **kwargs})
    batch = sched.schedule()
    assert batch.num_samples == 1
    assert np.isfinite(batch.temperature).all() and (batch.top_p > 0).all()
    sched.update(np.array([5], dtype=np.int64))
    check_invariants(sched)


def test_float32_edges_are_carried_exactly(Scheduler: Any) -> None:
    sched = Scheduler(*ARGS)
    sched.add_request(0, [1, 2], 2, temperature=3.4028235e38, top_p=1.5e-45)
    sched.add_request(1, [1, 2, 3], 2, temperature=1e-50)
    batch = sched.schedule()
    assert batch.temperature.tolist() == [FLOAT32_MAX, 0.0]
    assert batch.top_p[0] == np.float32(1.5e-45)
    assert not batch.all_greedy  # request 0 samples; request 1 is greedy


HOSTILE_CONSTRUCTORS = [
    ((2**63, 4, 4, 64, 64), ValueError, "num_blocks 9223372036854775808 does not fit int64"),
    ((16, 2**64, 4, 64, 64), ValueError, "block_size .* does not fit int64"),
    ((16, 4, 2**63, 2**63, 64), ValueError, "max_num_seqs .* does not fit int64"),
    ((16, 4, 4, 2**70, 64), ValueError, "max_num_batched_tokens .* does not fit int64"),
    ((16, 4, 4, 64, 2**63), ValueError, "max_model_len .* does not fit int64"),
    ((16, 4, 4, 64, -(2**63) - 1), ValueError, "max_model_len .* does not fit int64"),
    ((16, 4, 4, 64, 2**31), ValueError, "max_model_len must be in"),
    ((2**31 - 1, 2, 4, 64, 64), ValueError, "does not fit int32 slots"),
    ((2**62, 2**62, 4, 64, 64), ValueError, "does not fit int32 slots"),
    ((-(2**63), 4, 4, 64, 64), ValueError, "num_blocks must be >= 1"),
    ((16.0, 4, 4, 64, 64), TypeError, "num_blocks must be an int"),
    ((16, 4, "4", 64, 64), TypeError, "max_num_seqs must be an int"),
]


@pytest.mark.parametrize("args, error, match", HOSTILE_CONSTRUCTORS)
def test_hostile_constructors_are_refused(
    Scheduler: Any, args: tuple, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        Scheduler(*args)


def test_huge_max_num_seqs_is_bounded_by_the_pool(Scheduler: Any) -> None:
    """max_num_seqs far above the pool: at most num_blocks sequences ever run."""
    sched = Scheduler(4, 4, 2**62, 2**62, 16)
    for i in range(6):
        sched.add_request(i, [1, 2], 2)
    batch = sched.schedule()
    assert batch.num_seqs == 4 and (sched.num_running, sched.num_waiting) == (4, 2)


@pytest.mark.parametrize(
    "seq_id, error", [(2**64, ValueError), (-(2**63), ValueError), ("0", TypeError)]
)
def test_hostile_abort(Scheduler: Any, seq_id: Any, error: type) -> None:
    sched = Scheduler(*ARGS)
    sched.add_request(0, [1, 2], 2)
    with pytest.raises(error, match="seq_id"):
        sched.abort(seq_id)
    assert sched.num_waiting == 1


# ---- update() --------------------------------------------------------------------------------


def test_update_refuses_ids_outside_the_vocabulary(Scheduler: Any) -> None:
    sched = Scheduler(*ARGS)
    sched.add_request(0, [1, 2], 3, vocab_size=10)
    sched.add_request(1, [1, 2, 3], 3)  # no vocab_size: any id below 2**31
    sched.schedule()
    before = sched.debug_state()
    for tokens in ([10, 5], [2**31 - 1, 5], [10**6, 2**31 - 1]):
        with pytest.raises(ValueError, match="sampled token id .* of seq_id 0 .* vocab_size 10"):
            sched.update(np.array(tokens, dtype=np.int64))
        assert sched.debug_state() == before  # nothing changed
    assert sched.update(np.array([9, 2**31 - 1], dtype=np.int64)) == []
    sched.schedule()
    assert sched.update(np.array([0, 0], dtype=np.int64)) == []
    check_invariants(sched)


def test_a_wasted_rows_token_is_not_checked_against_the_vocabulary(Scheduler: Any) -> None:
    """Async: a row whose sequence stopped before its update() is ignored, whatever its id."""
    sched = Scheduler(32, 4, 4, 64, 64, True, True)
    sched.add_request(0, [5, 6, 7], 10, eos_token_ids=[2], vocab_size=10)
    sched.schedule()
    sched.schedule()  # a decode row for request 0, which stops on the first update
    assert sched.update(np.array([2], dtype=np.int64)) == [(0, "stop", [2])]
    assert sched.update(np.array([10**6], dtype=np.int64)) == []
    assert not sched.has_unfinished() and sched.num_free_blocks == 32


def test_async_empty_update_right_after_a_batch_without_samples(Scheduler: Any) -> None:
    """With a Batch with sampled rows outstanding, a Batch without any may be acknowledged with
    an empty update(), which changes nothing; the older Batch then gets its tokens."""
    sched = Scheduler(32, 4, 4, 8, 64, True, True)
    sched.add_request(0, [1, 2, 3], 1)  # one output: its prefill sample ends it
    sched.add_request(1, list(range(1, 21)), 2)  # 20 tokens: chunked 5, 8, 7
    first = sched.schedule()
    assert first.sample_seq_ids.tolist() == [0]
    second = sched.schedule()  # request 0 will stop by length: only request 1's middle chunk
    assert second.seq_ids.tolist() == [1] and second.num_samples == 0
    before = sched.debug_state()
    assert sched.update(np.empty(0, dtype=np.int64)) == []
    assert sched.debug_state() == before
    with pytest.raises(ValueError, match="shape \\(0,\\), expected \\(1,\\)"):
        sched.update(np.empty(0, dtype=np.int64))  # the next one is for `first`
    assert sched.update(np.array([7], dtype=np.int64)) == [(0, "length", [7])]
    third = sched.schedule()
    assert third.sample_seq_ids.tolist() == [1]
    assert sched.update(np.array([8], dtype=np.int64)) == []
    with pytest.raises(RuntimeError, match="without a scheduled Batch"):
        sched.update(np.empty(0, dtype=np.int64))


def test_empty_update_may_also_be_skipped(Scheduler: Any) -> None:
    sched = Scheduler(32, 4, 4, 8, 64, True, True)
    sched.add_request(0, [1, 2, 3], 1)
    sched.add_request(1, list(range(1, 21)), 2)
    sched.schedule()
    sched.schedule()  # no sampled rows; not acknowledged
    assert sched.update(np.array([7], dtype=np.int64)) == [(0, "length", [7])]
    assert sched.schedule().sample_seq_ids.tolist() == [1]


# ---- skip_prefix_cache, num_running / num_waiting ---------------------------------------------


def test_skip_prefix_cache_takes_no_hits_but_shares_its_blocks(Scheduler: Any) -> None:
    prompt = list(range(1, 10))  # two full blocks of 4, then one token
    sched = Scheduler(*ARGS)
    sched.add_request(0, prompt, 1, skip_prefix_cache=True)
    first = sched.schedule()
    sched.update(np.array([50], dtype=np.int64))
    assert sched.stats == {"num_preemptions": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0}

    sched.add_request(1, prompt, 1)  # hits the two blocks request 0 filled
    second = sched.schedule()
    sched.update(np.array([50], dtype=np.int64))
    assert second.input_ids.tolist() == [9]
    assert second.block_tables[0, :2].tolist() == first.block_tables[0, :2].tolist()
    assert sched.stats["prefix_cache_hits"] == 8

    sched.add_request(2, prompt, 1, skip_prefix_cache=True)  # the cache could serve 8 tokens
    third = sched.schedule()
    sched.update(np.array([50], dtype=np.int64))
    assert third.input_ids.tolist() == prompt
    assert set(third.block_tables[0].tolist()).isdisjoint(first.block_tables[0, :2].tolist())
    assert sched.stats == {"num_preemptions": 0, "prefix_cache_queries": 9, "prefix_cache_hits": 8}
    check_invariants(sched)


def test_skip_prefix_cache_after_preemption(Scheduler: Any) -> None:
    """A preempted request that skips the cache recomputes everything, its own blocks too."""
    sched = Scheduler(5, 2, 4, 64, 64)
    sched.add_request(0, [1, 2, 3], 3)
    sched.add_request(1, [4, 5, 6], 3, skip_prefix_cache=True)
    sched.schedule()
    sched.update(np.array([10, 20], dtype=np.int64))
    sched.schedule()
    sched.update(np.array([11, 21], dtype=np.int64))
    sched.schedule()  # both need a block, one is free: request 1 preempts itself
    sched.update(np.array([12], dtype=np.int64))
    assert sched.stats["num_preemptions"] == 1
    batch = sched.schedule()
    assert batch.input_ids.tolist() == [4, 5, 6, 20, 21]
    assert sched.stats["prefix_cache_hits"] == 0


def test_num_running_and_num_waiting(Scheduler: Any) -> None:
    sched = Scheduler(16, 4, 2, 64, 64)
    assert (sched.num_running, sched.num_waiting) == (0, 0)
    for i in range(3):
        sched.add_request(i, [1, 2, 3], 1)
    assert (sched.num_running, sched.num_waiting) == (0, 3)
    sched.schedule()
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    sched.update(np.array([5, 5], dtype=np.int64))
    assert (sched.num_running, sched.num_waiting) == (0, 1)
    sched.abort(2)
    assert (sched.num_running, sched.num_waiting) == (0, 0)
    with pytest.raises(AttributeError):
        sched.num_running = 3
