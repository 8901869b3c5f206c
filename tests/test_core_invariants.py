"""The invariants of DESIGN.md, checked on a scheduler's debug_state(); used by the other core tests."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
from minivllm.engine.reference import Scheduler as PyScheduler


def check_invariants(sched: Any, max_num_seqs: int | None = None) -> dict[str, Any]:
    """Assert every block-manager and queue invariant; return the snapshot."""
    st = sched.debug_state()
    ref_counts = st["ref_counts"]
    hashes = st["block_hashes"]
    num_blocks = len(ref_counts)
    free, cached = st["free_block_ids"], st["cached_block_ids"]
    free_set, cached_set = set(free), set(cached)
    assert len(free_set) == len(free), "a block is on the free stack twice"
    assert len(cached_set) == len(cached), "a block is on the LRU list twice"
    assert not free_set & cached_set

    tables = st["block_tables"]
    occurrences = Counter(b for table in tables.values() for b in table)
    for b in range(num_blocks):
        rc = ref_counts[b]
        assert rc == occurrences.get(b, 0), f"block {b}: refcount {rc} != table occurrences"
        states = (rc > 0) + (b in free_set) + (b in cached_set)
        assert states == 1, f"block {b} is in {states} of free / cached-free / referenced"
        if b in free_set:
            assert hashes[b] is None, f"free block {b} holds a hash"
        if b in cached_set:
            assert hashes[b] is not None, f"cached-free block {b} holds no hash"
    assert st["hash_to_block"] == {h: b for b, h in enumerate(hashes) if h is not None}
    assert sched.num_free_blocks == len(free) + len(cached)

    waiting, running = st["waiting"], st["running"]
    assert len(set(waiting)) == len(waiting) and len(set(running)) == len(running)
    assert not set(waiting) & set(running)
    assert set(waiting) | set(running) == set(tables)
    for seq_id in waiting:
        assert tables[seq_id] == [] and st["num_computed_tokens"][seq_id] == 0
    if max_num_seqs is not None:
        assert len(running) <= max_num_seqs
    assert sched.has_unfinished() == bool(tables)
    if not sched.has_unfinished():
        assert sched.num_free_blocks == num_blocks, "blocks leaked after all requests finished"
    return st


def test_checker_catches_a_leaked_reference() -> None:
    sched = PyScheduler(4, 2, 2, 8, 16)
    sched.add_request(0, [1, 2, 3], max_tokens=2)
    sched.schedule()
    check_invariants(sched)
    sched.block_manager.ref_counts[0] += 1
    with pytest.raises(AssertionError):
        check_invariants(sched)


def test_checker_catches_a_lost_block() -> None:
    sched = PyScheduler(4, 2, 2, 8, 16)
    sched.add_request(0, [1, 2, 3], max_tokens=1)
    sched.schedule()
    sched.update(np.array([5], dtype=np.int64))
    check_invariants(sched)
    sched.block_manager.free_block_ids.pop()
    with pytest.raises(AssertionError):
        check_invariants(sched)


def _implementations() -> list[Any]:
    impls = [pytest.param(PyScheduler, id="python")]
    try:
        from minivllm._core import Scheduler as CppScheduler
    except ImportError:  # the C++ core is not built yet
        return impls
    return [*impls, pytest.param(CppScheduler, id="cpp")]


# Both implementations of the core contract, for @pytest.mark.parametrize("Scheduler", IMPLS).
IMPLS = _implementations()
