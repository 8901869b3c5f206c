"""Unit tests for each scheduling rule, run against the C++ core and its Python twin: prefill
then decode, stop reasons, max_model_len, prefix caching (shared blocks, LRU eviction, reset),
chunked prefill and the token budget, max_num_seqs, preemption, abort, and the schedule / update
protocol. Requests the core refuses: test_core_scheduler_inputs.py; the Batch's sampling fields,
schedule_into and async scheduling: test_core_sampling_and_async.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scheduler_testing import I32, I64, assert_array, run_to_end, step
from test_core_invariants import IMPLS, check_invariants

pytestmark = pytest.mark.parametrize("Scheduler", IMPLS)


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
