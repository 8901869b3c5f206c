"""The Batch's sampling fields and async scheduling, against the C++ core and its Python twin:
per-row uniforms from (seed, length) alone, the all-greedy / top-k-or-p / min-p flags,
schedule_into writing the batch where the staging layout says (and refusing bad buffers), bad seeds;
then async scheduling, where a decode's input names a sample not read back yet."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from minivllm._core import StagingLayout
from scheduler_testing import assert_array
from test_core_invariants import IMPLS

pytestmark = pytest.mark.parametrize("Scheduler", IMPLS)


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
