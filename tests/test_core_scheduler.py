"""Unit tests for each scheduling rule, run against the C++ core and its Python twin."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from minivllm._core import StagingLayout
from test_core_invariants import IMPLS, check_invariants

pytestmark = pytest.mark.parametrize("Scheduler", IMPLS)

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


def test_prefill_then_decode_batches(Scheduler: Any) -> None:
    sched = Scheduler(8, 4, 4, 64, 64)
    sched.add_request(
        7, [1, 2, 3, 4, 5, 6], max_tokens=3, temperature=0.5, top_p=0.9, top_k=5, min_p=0.125
    )
    batch, finished = step(sched, [11])
    assert finished == []
    assert_array(batch.seq_ids, [7], I64)
    assert batch.num_decodes == 0
    assert_array(batch.input_ids, [1, 2, 3, 4, 5, 6], I32)
    assert_array(batch.positions, range(6), I32)
    assert_array(batch.slot_mapping, range(6), I32)
    assert_array(batch.query_start_loc, [0, 6], I32)
    assert_array(batch.seq_lens, [6], I32)
    assert_array(batch.block_tables, [[0, 1]], I32)
    assert_array(batch.logits_indices, [5], I32)
    assert_array(batch.sample_seq_ids, [7], I64)
    assert_array(batch.temperature, [0.5], np.float32)
    assert_array(batch.top_p, [0.9], np.float32)
    assert_array(batch.top_k, [5], I32)
    assert_array(batch.min_p, [0.125], np.float32)

    batch, finished = step(sched, [12])
    assert batch.num_decodes == 1
    assert_array(batch.input_ids, [11], I32)
    assert_array(batch.positions, [6], I32)
    assert_array(batch.slot_mapping, [6], I32)
    assert_array(batch.seq_lens, [7], I32)
    assert_array(batch.logits_indices, [0], I32)
    assert finished == []
    batch, finished = step(sched, [13])
    assert_array(batch.positions, [7], I32)
    assert finished == [(7, "length", [11, 12, 13])]
    assert not sched.has_unfinished()
    assert sched.num_free_blocks == 8
    assert sched.schedule() is None


def test_decode_crossing_a_block_boundary_gets_a_new_block(Scheduler: Any) -> None:
    sched = Scheduler(8, 4, 4, 64, 64, enable_prefix_caching=False)
    sched.add_request(0, [1, 2, 3, 4], max_tokens=3)
    step(sched)
    batch, _ = step(sched)
    assert_array(batch.slot_mapping, [4], I32)  # block 1, offset 0
    assert_array(batch.block_tables, [[0, 1]], I32)
    assert sched.num_free_blocks == 6


def test_stop_reasons(Scheduler: Any) -> None:
    sched = Scheduler(16, 4, 8, 64, 64)
    sched.add_request(0, [1, 2], max_tokens=10, eos_token_ids=[2, 9])
    sched.add_request(1, [1, 2], max_tokens=10, eos_token_ids=[9], ignore_eos=True)
    sched.add_request(
        2, [1, 2], max_tokens=10, eos_token_ids=[9], stop_token_ids=[9], ignore_eos=True
    )
    sched.add_request(3, [1, 2], max_tokens=2)
    _, finished = step(sched, [5, 5, 5, 5])
    assert finished == []
    _, finished = step(sched, [9, 9, 9, 9])
    assert sorted(finished) == [(0, "stop", [5, 9]), (2, "stop", [5, 9]), (3, "length", [5, 9])]
    assert run_to_end(sched, token=9) == [(1, "length", [5, 9] + [9] * 8)]


@pytest.mark.parametrize("prompt_len", [1, 5, 7])
def test_exactly_max_model_len(Scheduler: Any, prompt_len: int) -> None:
    sched = Scheduler(16, 2, 4, 64, 8)
    sched.add_request(0, list(range(1, prompt_len + 1)), max_tokens=100)
    finished = run_to_end(sched)
    assert finished == [(0, "length", [100] * (8 - prompt_len))]
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(1, list(range(8)), max_tokens=1)


@pytest.mark.parametrize("prompt_len, num_hit_blocks", [(8, 1), (9, 2), (11, 2), (12, 2)])
def test_full_prompt_cache_hit_computes_at_least_one_token(
    Scheduler: Any, prompt_len: int, num_hit_blocks: int
) -> None:
    bs = 4
    sched = Scheduler(16, bs, 4, 64, 64)
    prompt = list(range(1, prompt_len + 1))
    sched.add_request(0, prompt, max_tokens=1)
    first, _ = step(sched)
    assert not sched.has_unfinished()
    table0 = first.block_tables[0].tolist()

    sched.add_request(1, prompt, max_tokens=1)
    batch, finished = step(sched)
    num_cached = num_hit_blocks * bs
    assert_array(batch.input_ids, prompt[num_cached:], I32)
    assert_array(batch.positions, range(num_cached, prompt_len), I32)
    assert_array(batch.seq_lens, [prompt_len], I32)
    table = batch.block_tables[0].tolist()
    assert table[:num_hit_blocks] == table0[:num_hit_blocks]
    # The block the new tokens land in is never a shared cached block.
    written = {int(s) // bs for s in batch.slot_mapping}
    assert written.isdisjoint(table0[:num_hit_blocks])
    assert all(
        table[int(p) // bs] * bs + int(p) % bs == s
        for p, s in zip(batch.positions, batch.slot_mapping)
    )
    assert_array(batch.logits_indices, [prompt_len - num_cached - 1], I32)
    assert finished == [(1, "length", [100])]
    assert sched.stats["prefix_cache_hits"] == num_cached
    assert sched.stats["prefix_cache_queries"] == 2 * prompt_len


def test_running_sequences_share_cached_blocks(Scheduler: Any) -> None:
    sched = Scheduler(16, 2, 4, 64, 64)
    sched.add_request(0, [1, 2, 3, 4, 5], max_tokens=5)
    step(sched)
    sched.add_request(1, [1, 2, 3, 4, 6], max_tokens=5)
    batch, _ = step(sched)
    st = check_invariants(sched)
    assert st["block_tables"][0][:2] == st["block_tables"][1][:2]
    assert st["ref_counts"][st["block_tables"][0][0]] == 2
    assert_array(batch.positions, [5, 4], I32)  # decode of 0, then 1 computes one token
    assert sched.stats["prefix_cache_hits"] == 4
    run_to_end(sched)


def test_no_prefix_caching(Scheduler: Any) -> None:
    sched = Scheduler(16, 2, 4, 64, 64, enable_prefix_caching=False)
    for seq_id in range(2):
        sched.add_request(seq_id, [1, 2, 3, 4, 5], max_tokens=2)
        run_to_end(sched)
    assert sched.stats == {"num_preemptions": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0}
    assert check_invariants(sched)["cached_block_ids"] == []


def test_chunked_prefill_several_prompts_in_one_step(Scheduler: Any) -> None:
    sched = Scheduler(32, 4, 8, 8, 64)
    sched.add_request(0, list(range(1, 6)), max_tokens=4)
    sched.add_request(1, list(range(11, 16)), max_tokens=4)
    sched.add_request(2, list(range(21, 24)), max_tokens=4)
    batch, _ = step(sched, [50])
    assert_array(batch.seq_ids, [0, 1], I64)
    assert_array(batch.query_start_loc, [0, 5, 8], I32)
    assert_array(batch.positions, [0, 1, 2, 3, 4, 0, 1, 2], I32)
    assert_array(batch.logits_indices, [4], I32)  # seq 1's chunk does not end its prompt
    assert_array(batch.sample_seq_ids, [0], I64)
    # Decode of 0 first, then 1 continues (2 tokens), then 2 is admitted (3 of its 3 tokens).
    batch, _ = step(sched, [51, 61, 71])
    assert batch.num_decodes == 1
    assert_array(batch.seq_ids, [0, 1, 2], I64)
    assert_array(batch.input_ids, [50, 14, 15, 21, 22, 23], I32)
    assert_array(batch.positions, [5, 3, 4, 0, 1, 2], I32)
    assert_array(batch.query_start_loc, [0, 1, 3, 6], I32)
    assert_array(batch.seq_lens, [6, 5, 3], I32)
    assert_array(batch.logits_indices, [0, 2, 5], I32)
    assert_array(batch.sample_seq_ids, [0, 1, 2], I64)
    assert batch.block_tables.shape == (3, 2)
    assert batch.block_tables[2, 1] == -1
    run_to_end(sched)


def test_token_budget_limits_chunk(Scheduler: Any) -> None:
    sched = Scheduler(32, 4, 2, 3, 64)
    sched.add_request(0, list(range(1, 8)), max_tokens=2)
    sizes = []
    while sched.has_unfinished():
        batch, _ = step(sched)
        sizes.append(len(batch.input_ids))
    assert sizes == [3, 3, 1, 1]


def test_max_num_seqs_caps_running(Scheduler: Any) -> None:
    sched = Scheduler(32, 4, 2, 64, 64)
    for seq_id in range(3):
        sched.add_request(seq_id, [1, 2, 3], max_tokens=2)
    batch, _ = step(sched)
    assert_array(batch.seq_ids, [0, 1], I64)
    batch, _ = step(sched)
    assert_array(batch.seq_ids, [0, 1], I64)
    batch, _ = step(sched)
    assert_array(batch.seq_ids, [2], I64)


def test_preempted_then_resumed_hits_its_own_cache(Scheduler: Any) -> None:
    sched = Scheduler(5, 2, 4, 64, 64)
    sched.add_request(0, [1, 2, 3], max_tokens=3)
    sched.add_request(1, [4, 5, 6], max_tokens=3)
    step(sched, [10, 20])  # blocks: 0 -> [0, 1], 1 -> [2, 3]
    step(sched, [11, 21])
    # Both decode at position 4 and need a block; one is free. Seq 1 (newest) preempts itself.
    batch, finished = step(sched, [12])
    assert_array(batch.seq_ids, [0], I64)
    assert finished == [(0, "length", [10, 11, 12])]
    assert sched.stats["num_preemptions"] == 1
    # Seq 1 re-prefills prompt + outputs (5 tokens) and hits its two full cached blocks.
    batch, _ = step(sched, [22])
    assert_array(batch.seq_ids, [1], I64)
    assert batch.num_decodes == 0
    assert_array(batch.input_ids, [21], I32)
    assert_array(batch.positions, [4], I32)
    assert_array(batch.block_tables, [[2, 3, 4]], I32)
    assert_array(batch.slot_mapping, [8], I32)
    assert sched.stats["prefix_cache_hits"] == 4
    assert sched.stats["prefix_cache_queries"] == 3 + 3 + 5
    assert run_to_end(sched) == [] and not sched.has_unfinished()
    assert sched.num_free_blocks == 5


def test_preemption_takes_newest_first_and_requeues_at_front(Scheduler: Any) -> None:
    sched = Scheduler(6, 2, 8, 64, 64, enable_prefix_caching=False)
    for seq_id in range(3):
        sched.add_request(seq_id, [1, 2, 3, 4], max_tokens=8)
    sched.add_request(3, [1], max_tokens=1)
    step(sched)  # 0, 1, 2 take blocks 0..5; 3 waits
    st = check_invariants(sched)
    assert st["running"] == [0, 1, 2] and st["waiting"] == [3]
    # Each decode at position 4 needs a block and none is free: 2 (newest) is preempted.
    batch, _ = step(sched)
    st = check_invariants(sched)
    assert sched.stats["num_preemptions"] == 1
    assert_array(batch.seq_ids, [0, 1], I64)
    assert st["running"] == [0, 1] and st["waiting"] == [2, 3]
    run_to_end(sched)


def test_lru_eviction_order(Scheduler: Any) -> None:
    sched = Scheduler(4, 2, 4, 64, 64)
    sched.add_request(0, [1, 2, 3, 4, 5], max_tokens=1)
    step(sched)
    st = check_invariants(sched)
    # Freed in reverse table order: the partial block goes to the free stack, the full ones
    # to the LRU list tail-first, so a sequence's tail is evicted before its head.
    assert st["free_block_ids"] == [3, 2] and st["cached_block_ids"] == [1, 0]
    sched.add_request(1, [7, 8, 9, 10, 11], max_tokens=1)
    batch, _ = step(sched)
    assert_array(batch.block_tables, [[2, 3, 1]], I32)  # free stack first, then evict 1
    st = check_invariants(sched)
    assert st["cached_block_ids"] == [0, 3, 2]
    sched.add_request(2, [1, 2, 3, 4, 5], max_tokens=1)
    batch, _ = step(sched)
    assert_array(batch.block_tables, [[0, 1, 3]], I32)  # hit on 0; [3, 4] was evicted
    assert_array(batch.positions, [2, 3, 4], I32)
    assert sched.stats["prefix_cache_hits"] == 2


def test_reset_prefix_cache(Scheduler: Any) -> None:
    """Every hash goes; cached-free blocks return to the free stack oldest first; a referenced
    block loses its hash and is not offered again; later prompts miss."""
    sched = Scheduler(8, 2, 4, 64, 64)
    sched.add_request(0, [1, 2, 3, 4, 5], max_tokens=1)
    step(sched)  # blocks [0, 1] cached, [2] free again
    sched.add_request(1, [7, 8, 9, 10, 11], max_tokens=3)
    step(sched)  # running: its two full blocks registered
    st = check_invariants(sched)
    assert st["cached_block_ids"] == [1, 0] and len(st["hash_to_block"]) == 4
    free_before = sched.num_free_blocks
    assert sched.reset_prefix_cache() == 4
    st = check_invariants(sched)
    assert st["cached_block_ids"] == [] and st["hash_to_block"] == {}
    assert all(h is None for h in st["block_hashes"])
    assert st["free_block_ids"][-2:] == [1, 0] and sched.num_free_blocks == free_before
    queries, hits = sched.stats["prefix_cache_queries"], sched.stats["prefix_cache_hits"]
    sched.add_request(2, [1, 2, 3, 4, 5], max_tokens=1)
    run_to_end(sched)
    assert (
        sched.stats["prefix_cache_hits"] == hits and sched.stats["prefix_cache_queries"] > queries
    )
    assert sched.reset_prefix_cache() >= 2  # prompt 2's blocks registered again
    assert check_invariants(sched)["hash_to_block"] == {}


def test_abort(Scheduler: Any) -> None:
    sched = Scheduler(8, 2, 4, 64, 64)
    sched.add_request(0, [1, 2, 3], max_tokens=5)
    sched.add_request(1, [4, 5, 6], max_tokens=5)
    sched.add_request(2, [7, 8, 9], max_tokens=5)
    step(sched)
    sched.abort(2)
    check_invariants(sched)
    batch = sched.schedule()
    sched.abort(0)  # between schedule() and update(): its sampled row is ignored
    assert sched.update(np.array([1, 2], dtype=I64)) == []
    st = check_invariants(sched)
    assert st["running"] == [1]
    with pytest.raises(ValueError, match="7"):
        sched.abort(7)
    with pytest.raises(ValueError, match="0"):
        sched.abort(0)
    sched.add_request(0, [1, 2, 3], max_tokens=1)  # the id is free again
    sched.abort(0)
    sched.abort(1)
    assert not sched.has_unfinished() and sched.num_free_blocks == 8
    assert batch is not None


def test_protocol_errors(Scheduler: Any) -> None:
    sched = Scheduler(8, 2, 4, 64, 64)
    with pytest.raises(RuntimeError):
        sched.update(np.zeros(0, dtype=I64))
    sched.add_request(0, [1, 2, 3], max_tokens=5)
    sched.schedule()
    with pytest.raises(RuntimeError):
        sched.schedule()
    sched.update(np.array([5], dtype=I64))
    with pytest.raises(RuntimeError):
        sched.update(np.array([5], dtype=I64))


def test_batch_without_samples_needs_no_update(Scheduler: Any) -> None:
    sched = Scheduler(8, 2, 4, 4, 64)
    sched.add_request(0, list(range(1, 10)), max_tokens=1)
    batch = sched.schedule()
    assert len(batch.sample_seq_ids) == 0
    batch = sched.schedule()  # no update needed
    assert_array(batch.positions, [4, 5, 6, 7], I32)
    assert sched.update(np.zeros(0, dtype=I64)) == []
    batch = sched.schedule()
    assert_array(batch.positions, [8], I32)
    assert sched.update(np.array([3], dtype=I64)) == [(0, "length", [3])]


BAD_REQUESTS = [
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": [1, -2]}, "-2"),
    ({"prompt_token_ids": [1, 50], "vocab_size": 50}, "50"),
    ({"prompt_token_ids": [1, 2**31]}, str(2**31)),
    ({"prompt_token_ids": list(range(16))}, "max_model_len"),
    ({"prompt_token_ids": [1], "max_tokens": 100}, "num_blocks"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": -0.5}, "min_p"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"prompt_token_ids": np.array([1.0, 2.0])}, "prompt_token_ids"),
    ({"prompt_token_ids": np.array([[1, 2]])}, "prompt_token_ids"),
]


@pytest.mark.parametrize("kwargs, match", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_requests_are_rejected(Scheduler: Any, kwargs: dict, match: str) -> None:
    sched = Scheduler(4, 2, 4, 64, 16)  # at most 8 KV slots per request
    args = {"seq_id": 3, "prompt_token_ids": [1, 2], "max_tokens": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        sched.add_request(**args)
    assert not sched.has_unfinished()
    check_invariants(sched)


def test_largest_request_that_fits_is_accepted(Scheduler: Any) -> None:
    sched = Scheduler(4, 2, 4, 64, 16)
    sched.add_request(0, [1], max_tokens=8)  # 9 tokens, 8 of them need a KV slot
    sched.add_request(1, np.arange(1, 8, dtype=np.int32), max_tokens=2)
    with pytest.raises(ValueError, match="num_blocks"):
        sched.add_request(2, [1], max_tokens=9)
    assert len(run_to_end(sched)) == 2
    sched = Scheduler(8, 2, 4, 64, 16)
    sched.add_request(0, np.arange(1, 16, dtype=np.uint16), max_tokens=100)  # capped at 16
    assert run_to_end(sched) == [(0, "length", [100])]


def test_duplicate_seq_id(Scheduler: Any) -> None:
    sched = Scheduler(8, 2, 4, 64, 16)
    sched.add_request(5, [1, 2], max_tokens=1)
    with pytest.raises(ValueError, match="5"):
        sched.add_request(5, [3], max_tokens=1)
    run_to_end(sched)
    sched.add_request(5, [3], max_tokens=1)  # finished ids may be reused


@pytest.mark.parametrize(
    "tokens, match",
    [
        (np.array([1, 2], dtype=np.int64), "shape"),
        (np.array([], dtype=np.int64), "shape"),
        (np.array([[1]], dtype=np.int64), "shape"),
        (np.array([1], dtype=np.int32), "int64"),
        (np.array([1.0]), "int64"),
        ([1], "int64"),
        (np.array([-1], dtype=np.int64), "-1"),
        (np.array([2**31], dtype=np.int64), str(2**31)),
    ],
)
def test_bad_update_is_rejected_and_can_be_retried(Scheduler: Any, tokens: Any, match: str) -> None:
    sched = Scheduler(8, 2, 4, 64, 16)
    sched.add_request(0, [1, 2], max_tokens=1)
    sched.schedule()
    with pytest.raises(ValueError, match=match):
        sched.update(tokens)
    assert sched.update(np.array([4], dtype=np.int64)) == [(0, "length", [4])]
    check_invariants(sched)


@pytest.mark.parametrize(
    "args",
    [
        (0, 16, 4, 64, 64),
        (8, 0, 4, 64, 64),
        (8, 16, 0, 64, 64),
        (8, 16, 8, 4, 64),
        (8, 16, 4, 64, 1),
        (2**20, 2**12, 4, 64, 64),
    ],
)
def test_bad_constructor_arguments(Scheduler: Any, args: tuple) -> None:
    with pytest.raises(ValueError):
        Scheduler(*args)


def test_accepted_input_forms(Scheduler: Any) -> None:
    sched = Scheduler(16, 4, 4, 64, 64)
    sched.add_request(
        np.int64(0),
        np.array([1, 2, 3], dtype=np.uint8),
        max_tokens=np.int32(2),
        eos_token_ids={7},
        stop_token_ids=np.array([8]),
    )
    sched.add_request(1, (np.int64(4), 5), max_tokens=2, eos_token_ids=iter([7]))
    batch = sched.schedule()
    tokens = np.array([[7, 0], [9, 0]], dtype=np.int64)[:, 0]  # non-contiguous int64 view
    assert not tokens.flags.c_contiguous
    assert sched.update(tokens) == [(0, "stop", [7])]
    assert_array(batch.input_ids, [1, 2, 3, 4, 5], I32)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt_token_ids": [1.5]},
        {"prompt_token_ids": ["a"]},
        {"prompt_token_ids": 3},
        {"seq_id": 1.0},
        {"max_tokens": "1"},
        {"eos_token_ids": [0.5]},
    ],
)
def test_wrong_types_raise_type_error(Scheduler: Any, kwargs: dict) -> None:
    sched = Scheduler(16, 4, 4, 64, 64)
    with pytest.raises(TypeError):
        sched.add_request(**{"seq_id": 0, "prompt_token_ids": [1], "max_tokens": 1, **kwargs})
    assert not sched.has_unfinished()


_INT64 = st.integers(-(2**63), 2**63 - 1)
_ANY_INT = st.one_of(st.integers(-3, 40), _INT64)
_ANY_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1.0]))


@given(
    seq_id=_ANY_INT,
    prompt=st.lists(_ANY_INT, max_size=20),
    max_tokens=_ANY_INT,
    temperature=_ANY_FLOAT,
    top_p=_ANY_FLOAT,
    top_k=_ANY_INT,
    min_p=_ANY_FLOAT,
    vocab_size=st.one_of(st.none(), _ANY_INT),
    tokens=st.lists(_INT64, min_size=1, max_size=3),
)
@example(  # float32 rounds this temperature to infinity: refused by both, without a warning
    seq_id=0,
    prompt=[0],
    max_tokens=1,
    temperature=3.4028235677973366e38,
    top_p=1.0,
    top_k=0,
    min_p=0.0,
    vocab_size=None,
    tokens=[0],
)
def test_arbitrary_arguments_never_break_the_core(
    Scheduler: Any,
    seq_id: int,
    prompt: list[int],
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
    vocab_size: int | None,
    tokens: list[int],
) -> None:
    sched = Scheduler(8, 4, 2, 8, 32)
    kwargs = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}
    try:
        sched.add_request(seq_id, prompt, max_tokens, vocab_size=vocab_size, **kwargs)
    except (ValueError, TypeError):
        assert not sched.has_unfinished()
    check_invariants(sched)
    for _ in range(100):
        batch = sched.schedule()
        if batch is None:
            break
        n = len(batch.sample_seq_ids)
        for bad in (np.array(tokens, dtype=np.int64), np.array(tokens[:1] * (n + 1), np.int64)):
            if len(bad) != n or bad.min() < 0 or bad.max() >= 2**31:
                with pytest.raises(ValueError):
                    sched.update(bad)
        sched.update(np.full(n, 3, dtype=np.int64))
        check_invariants(sched)
    assert not sched.has_unfinished()


# ---- sampling fields and schedule_into ------------------------------------------------------


def test_uniforms_follow_seed_and_length_only(Scheduler: Any) -> None:
    """Each sampled row's uniform is sampling_uniforms(seed, seq_len): the numpy formula the
    sampler documents, whatever else is in the batch."""
    from minivllm.engine.reference import sampling_uniforms

    sched = Scheduler(64, 4, 4, 64, 64)
    seeds = [0, 12345, 2**63 + 5, 2**64 - 1]
    for i, seed in enumerate(seeds):
        sched.add_request(i, list(range(1, 3 + 3 * i)), 5, seed=seed, temperature=0.8)
    for _ in range(3):
        batch = sched.schedule()
        rows = np.searchsorted(batch.query_start_loc, batch.logits_indices, side="right") - 1
        want = sampling_uniforms(
            np.array([seeds[i] for i in batch.sample_seq_ids], dtype=np.uint64),
            batch.seq_lens[rows].astype(np.int64),
        ).astype(np.float32)
        assert_array(batch.uniforms, np.minimum(want, np.float32(1 - 2**-24)), np.float32)
        assert ((batch.uniforms >= 0) & (batch.uniforms < 1)).all()
        sched.update(np.full(batch.num_samples, 7, dtype=np.int64))


@pytest.mark.parametrize(
    ("params", "flags"),
    [
        ({"temperature": 0.0}, (True, False, False)),
        ({"temperature": 0.7, "top_k": 1, "top_p": 0.5}, (True, False, False)),  # top_k 1: greedy
        ({"temperature": 0.7}, (False, False, False)),
        ({"temperature": 0.7, "top_p": 0.9}, (False, True, False)),
        ({"temperature": 0.7, "top_k": 5}, (False, True, False)),
        ({"temperature": 0.7, "top_k": 50, "vocab_size": 50}, (False, False, False)),
        ({"temperature": 0.7, "top_k": 50, "vocab_size": 51}, (False, True, False)),
        ({"temperature": 0.7, "min_p": 0.1}, (False, False, True)),
        ({"temperature": 0.0, "top_p": 0.5, "min_p": 0.1}, (True, False, False)),
    ],
)
def test_batch_sampling_flags(Scheduler: Any, params: dict, flags: tuple) -> None:
    sched = Scheduler(16, 4, 4, 64, 32)
    sched.add_request(0, [1, 2, 3], 2, **params)
    sched.add_request(1, [1, 2, 3, 4], 2, temperature=0.0)  # a greedy neighbour changes nothing
    batch = sched.schedule()
    assert (batch.all_greedy, batch.any_top_k_or_p, batch.any_min_p) == flags


def _layout(sched_args: tuple, host_size: int = 4096) -> tuple[StagingLayout, np.ndarray]:
    _, block_size, max_seqs, max_tokens, max_model_len = sched_args
    layout = StagingLayout(max_tokens, max_seqs, -(-max_model_len // block_size))
    return layout, np.full(max(layout.total, host_size), -9, dtype=np.int32)


def test_schedule_into_writes_the_batch_at_the_layout(Scheduler: Any) -> None:
    args = (32, 4, 4, 16, 24)
    layout, host = _layout(args)
    twin = Scheduler(*args)
    sched = Scheduler(*args)
    for s in (sched, twin):
        s.add_request(0, [1, 2, 3, 4, 5, 6], 3, temperature=0.5, top_p=0.9, seed=3)
        s.add_request(1, [7, 8], 3, temperature=0.0, top_k=4, min_p=0.2)
    for step_index in range(3):
        ref = twin.schedule()
        staged = sched.schedule_into(host, layout)
        at = {name: layout.offset(name) for name in layout.fields}
        t, b, s = ref.num_tokens, ref.num_seqs, ref.num_samples
        floats = host.view(np.float32)
        for name in ("input_ids", "positions", "slot_mapping"):
            assert np.array_equal(host[at[name] : at[name] + t], getattr(ref, name)), name
        if step_index == 0:
            assert host[at["input_ids"] + t] == -9  # nothing past the used part
        assert np.array_equal(host[at["seq_lens"] : at["seq_lens"] + b], ref.seq_lens)
        assert np.array_equal(
            host[at["logits_indices"] : at["logits_indices"] + s], ref.logits_indices
        )
        assert np.array_equal(host[at["top_k"] : at["top_k"] + s], ref.top_k)
        for name in ("temperature", "top_p", "min_p", "uniforms"):
            assert np.array_equal(floats[at[name] : at[name] + s], getattr(ref, name)), name
        stride = layout.max_blocks
        tables = host[at["block_tables"] :][: 4 * stride].reshape(4, stride)
        assert np.array_equal(tables[:b, : ref.max_blocks], ref.block_tables)
        for name in ("seq_ids", "sample_seq_ids", "query_start_loc"):
            assert np.array_equal(getattr(staged, name), getattr(ref, name)), name
        assert (staged.num_decodes, staged.all_greedy, staged.any_top_k_or_p) == (
            ref.num_decodes,
            ref.all_greedy,
            ref.any_top_k_or_p,
        )
        tokens = np.full(s, 9, dtype=np.int64)
        sched.update(tokens)
        twin.update(tokens)


def test_schedule_into_rejects_bad_buffers_and_changes_nothing(Scheduler: Any) -> None:
    args = (32, 4, 4, 16, 24)
    layout, host = _layout(args)
    sched = Scheduler(*args)
    sched.add_request(0, [1, 2, 3], 3)
    small = StagingLayout(16, 3, 6)  # fewer rows than max_num_seqs
    offsets = {name: layout.offset(name) for name in layout.fields}
    outside = StagingLayout(16, 4, 6, offsets={**offsets, "input_ids": len(host) - 2})
    cases = [
        (host.astype(np.int64), layout, "host must be a numpy int32 array"),
        (host[::2], layout, "contiguous"),
        (host, small, "below the scheduler's"),
        (host, outside, "the staging layout needs"),
    ]
    for h, lay, message in cases:
        with pytest.raises(ValueError, match=message):
            sched.schedule_into(h, lay)
    with pytest.raises(TypeError, match="StagingLayout"):
        sched.schedule_into(host, np.zeros(14, dtype=np.int64))
    assert sched.debug_state()["waiting"] == [0]  # nothing was scheduled
    assert sched.schedule_into(host, layout).num_tokens == 3


def test_bad_seed(Scheduler: Any) -> None:
    sched = Scheduler(16, 4, 4, 16, 32)
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match="seed must be in"):
            sched.add_request(0, [1, 2], 2, seed=seed)
    with pytest.raises(TypeError, match="seed must be an int"):
        sched.add_request(0, [1, 2], 2, seed=1.5)
    sched.add_request(0, [1, 2], 2, seed=np.uint64(2**64 - 1))


# ---- async scheduling -------------------------------------------------------------------------


def test_async_decode_inputs_name_the_previous_samples(Scheduler: Any) -> None:
    sched = Scheduler(32, 4, 4, 64, 64, True, True)
    sched.add_request(0, [5, 6, 7], 4, ignore_eos=True)
    sched.add_request(1, [8, 9], 4, ignore_eos=True)
    first = sched.schedule()  # prefill both, sampled rows 0 and 1
    second = sched.schedule()  # decodes of the tokens not sampled yet
    assert second.num_decodes == 2
    assert second.input_ids.tolist() == [-1, -2]  # sampled rows 0 and 1 of `first`
    assert second.positions.tolist() == [3, 2]
    with pytest.raises(RuntimeError, match="two Batches"):
        sched.schedule()
    assert sched.update(np.array([11, 12], dtype=np.int64)) == []
    third = sched.schedule()
    assert third.input_ids.tolist() == [-1, -2]  # now rows of `second`
    sched.update(np.array([13, 14], dtype=np.int64))
    sched.update(np.array([15, 16], dtype=np.int64))
    fourth = sched.schedule()
    assert fourth.input_ids.tolist() == [15, 16]  # nothing outstanding: real ids
    finished = sched.update(np.array([17, 18], dtype=np.int64))
    assert sorted(finished) == [(0, "length", [11, 13, 15, 17]), (1, "length", [12, 14, 16, 18])]
    assert not sched.has_unfinished() and sched.num_free_blocks == 32
    del first


def test_async_no_row_when_length_will_end_it(Scheduler: Any) -> None:
    sched = Scheduler(32, 4, 4, 64, 64, True, True)
    sched.add_request(0, [5, 6, 7], 1)  # one output: its prefill sample ends it
    sched.add_request(1, [8, 9], 3)
    sched.schedule()
    second = sched.schedule()
    assert second.seq_ids.tolist() == [1]  # request 0 will stop by length: no wasted row
    assert sched.update(np.array([11, 12], dtype=np.int64)) == [(0, "length", [11])]
    sched.update(np.array([13], dtype=np.int64))
    assert sched.schedule().input_ids.tolist() == [13]


def test_async_stop_token_wastes_one_row_that_is_ignored(Scheduler: Any) -> None:
    sched = Scheduler(32, 4, 4, 64, 64, True, True)
    sched.add_request(0, [5, 6, 7], 10, eos_token_ids=[2])
    sched.add_request(1, [8, 9], 10, ignore_eos=True)
    sched.schedule()
    second = sched.schedule()
    assert second.seq_ids.tolist() == [0, 1]
    assert sched.update(np.array([2, 12], dtype=np.int64)) == [(0, "stop", [2])]
    third = sched.schedule()  # request 0 is gone; its row in `second` is wasted
    assert third.seq_ids.tolist() == [1]
    assert sched.update(np.array([99, 13], dtype=np.int64)) == []  # 99 is ignored
    sched.update(np.array([14], dtype=np.int64))
    sched.abort(1)
    assert sched.num_free_blocks == 32 and not sched.has_unfinished()


def test_async_prefix_blocks_register_once_known(Scheduler: Any) -> None:
    """A block whose last token is still a placeholder is not offered to the prefix cache."""
    sched = Scheduler(32, 4, 4, 64, 64, True, True)
    sched.add_request(0, [5, 6, 7], 10, ignore_eos=True)  # token 4 completes block 0
    sched.schedule()
    sched.schedule()  # computes position 3 (a placeholder): block 0 is full but not known
    assert sum(h is not None for h in sched.debug_state()["block_hashes"]) == 0
    sched.update(np.array([8], dtype=np.int64))
    assert sum(h is not None for h in sched.debug_state()["block_hashes"]) == 1
    sched.update(np.array([9], dtype=np.int64))
    sched.abort(0)
    sched.add_request(1, [5, 6, 7, 8, 1], 2)  # shares block 0 with request 0
    sched.schedule()
    assert sched.stats["prefix_cache_hits"] == 4


def test_sync_scheduler_refuses_a_second_schedule(Scheduler: Any) -> None:
    sched = Scheduler(32, 4, 4, 64, 64)
    sched.add_request(0, [5, 6, 7], 4)
    sched.schedule()
    with pytest.raises(RuntimeError, match="before update"):
        sched.schedule()
