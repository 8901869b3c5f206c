"""The staging layout (minivllm._core.StagingLayout, csrc/include/minivllm/staging.h) and
schedule_into: the layout's arithmetic, hostile layouts and buffers (refused with ValueError,
nothing scheduled or written), and the twin's staging writer held against the core's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from minivllm._core import STAGING_FIELDS, StagingLayout
from minivllm._core import Scheduler as CppScheduler
from minivllm.engine.reference import write_staging
from test_core_invariants import IMPLS

I64_MAX = 2**63 - 1
FIELDS = [name for name, _, _ in STAGING_FIELDS]
EXTENTS = {name: extent for name, _, extent in STAGING_FIELDS}


def test_staging_fields() -> None:
    assert STAGING_FIELDS == (
        ("input_ids", "int32", "tokens"),
        ("positions", "int32", "tokens"),
        ("slot_mapping", "int32", "tokens"),
        ("logits_indices", "int32", "seqs"),
        ("seq_lens", "int32", "seqs"),
        ("prefill_cu_seqlens", "int32", "seqs+1"),
        ("block_tables", "int32", "block_tables"),
        ("top_k", "int32", "seqs"),
        ("temperature", "float32", "seqs"),
        ("top_p", "float32", "seqs"),
        ("min_p", "float32", "seqs"),
        ("uniforms", "float32", "seqs"),
        ("prefill_tiles", "int32", "tiles"),
        ("decode_order", "int32", "seqs"),
    )


def extent_size(extent: str, tokens: int, seqs: int, blocks: int, tiles: int) -> int:
    return {
        "tokens": tokens,
        "seqs": seqs,
        "seqs+1": seqs + 1,
        "block_tables": seqs * blocks,
        "tiles": tiles,
    }[extent]


@pytest.mark.parametrize("caps", [(1, 1, 1, 1), (16, 4, 6, 1), (8192, 256, 512, 37)])
def test_packed_layout(caps: tuple[int, int, int, int]) -> None:
    layout = StagingLayout(*caps)
    assert (layout.max_tokens, layout.max_seqs, layout.max_blocks, layout.max_tiles) == caps
    assert layout.fields == tuple(FIELDS)
    pos = 0
    for name, dtype, extent in STAGING_FIELDS:
        assert layout.offset(name) == pos
        assert layout.size(name) == extent_size(extent, *caps)
        assert (layout.dtype(name), layout.extent(name)) == (dtype, extent)
        pos += layout.size(name)
    assert layout.total == pos
    assert StagingLayout(*caps[:3]).max_tiles == 1


def test_given_offsets_in_any_order_with_gaps() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        caps = tuple(int(c) for c in rng.integers(1, 40, size=4))
        offsets, pos = {}, 0
        for name in rng.permutation(FIELDS):
            pos += int(rng.integers(0, 5))
            offsets[str(name)] = pos
            pos += extent_size(EXTENTS[name], *caps)
        layout = StagingLayout(*caps, offsets=offsets)
        assert {name: layout.offset(name) for name in FIELDS} == offsets
        assert layout.total == pos


def _packed_offsets(caps: tuple[int, int, int, int] = (16, 4, 6, 1)) -> dict[str, int]:
    layout = StagingLayout(*caps)
    return {name: layout.offset(name) for name in FIELDS}


# (constructor arguments, expected exception, message pattern)
HOSTILE_LAYOUTS = [
    ((0, 4, 6), ValueError, "max_tokens must be >= 1, got 0"),
    ((16, -1, 6), ValueError, "max_seqs must be >= 1, got -1"),
    ((16, 4, 0), ValueError, "max_blocks must be >= 1"),
    ((16, 4, 6, 0), ValueError, "max_tiles must be >= 1"),
    ((2**63, 4, 6), ValueError, "max_tokens 9223372036854775808 does not fit int64"),
    ((16, -(2**63) - 1, 6), ValueError, "max_seqs .* does not fit int64"),
    ((16, 4, 2**70), ValueError, "max_blocks .* does not fit int64"),
    ((16, 2**62, 4), ValueError, "max_seqs \\* max_blocks = 4611686018427387904 \\* 4"),
    ((16, 2**31, 2**32), ValueError, "max_seqs \\* max_blocks"),
    ((16, I64_MAX, 1), ValueError, "max_seqs \\+ 1"),
    ((2**62, 4, 6), ValueError, "ends past int64"),  # three token fields
    ((I64_MAX, 1, 1), ValueError, "ends past int64"),
    ((16, 4, 6, I64_MAX), ValueError, "prefill_tiles .* ends past int64"),
    ((1.5, 4, 6), TypeError, "max_tokens must be an int"),
    (("16", 4, 6), TypeError, "max_tokens must be an int"),
]


@pytest.mark.parametrize("args, error, match", HOSTILE_LAYOUTS)
def test_hostile_capacities_are_refused(args: tuple, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        StagingLayout(*args)


def _with(**changes: int) -> dict[str, int]:
    return {**_packed_offsets(), **changes}


HOSTILE_OFFSETS = [
    (_with(input_ids=2**63 - 8), ValueError, "input_ids at offset 9223372036854775800"),
    (_with(block_tables=I64_MAX), ValueError, "block_tables .* ends past int64"),
    (_with(decode_order=2**63), ValueError, "offset of decode_order .* does not fit int64"),
    (_with(top_k=-1), ValueError, "offset of top_k must be >= 0, got -1"),
    (_with(top_k=-(2**63)), ValueError, "offset of top_k must be >= 0"),
    (_with(positions=1), ValueError, "fields input_ids \\[0, 16\\) and positions .* overlap"),
    (_with(uniforms=_packed_offsets()["min_p"]), ValueError, "overlap"),
    (_with(block_tables=_packed_offsets()["block_tables"] + 1), ValueError, "overlap"),
    ({k: v for k, v in _packed_offsets().items() if k != "seq_lens"}, ValueError, "seq_lens"),
    ({**_packed_offsets(), "bogus": 500}, ValueError, "unknown staging field 'bogus'"),
    ({**_packed_offsets(), 3: 500}, TypeError, "field names"),
    (_with(top_k=1.0), TypeError, "offset of top_k must be an int"),  # type: ignore[arg-type]
    ([("input_ids", 0)], TypeError, "offsets must be a dict"),
]


@pytest.mark.parametrize("offsets, error, match", HOSTILE_OFFSETS)
def test_hostile_offsets_are_refused(offsets: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        StagingLayout(16, 4, 6, offsets=offsets)


def test_largest_layouts_that_fit_int64_are_accepted() -> None:
    packed = StagingLayout(1, 1, 1)  # moved up against the end of int64
    start = I64_MAX - packed.total
    layout = StagingLayout(1, 1, 1, offsets={n: start + packed.offset(n) for n in FIELDS})
    assert layout.total == I64_MAX
    big = StagingLayout(1, 2**31, 2**31 - 1)
    assert big.size("block_tables") == 2**31 * (2**31 - 1)


@pytest.mark.parametrize("method", ["offset", "size", "dtype", "extent"])
def test_unknown_field_names(method: str) -> None:
    layout = StagingLayout(16, 4, 6)
    with pytest.raises(ValueError, match="unknown staging field 'block_table'"):
        getattr(layout, method)("block_table")
    with pytest.raises(TypeError):
        getattr(layout, method)(3)


def _misaligned(n: int) -> np.ndarray:
    buf = np.frombuffer(bytearray(4 * n + 1), dtype=np.int32, count=n, offset=1)
    assert not buf.flags.aligned and buf.flags.writeable
    return buf


def _read_only(n: int) -> np.ndarray:
    buf = np.zeros(n, dtype=np.int32)
    buf.flags.writeable = False
    return buf


def hostile_hosts(total: int) -> list[tuple[str, Any, str]]:
    """(name, host buffer, message pattern) for buffers a layout of `total` must refuse."""
    return [
        ("list", [0] * total, "numpy int32 array .*got list"),
        ("int64", np.zeros(total, dtype=np.int64), "got int64"),
        ("uint32", np.zeros(total, dtype=np.uint32), "got uint32"),
        ("float32", np.zeros(total, dtype=np.float32), "got float32"),
        ("big-endian", np.zeros(total, dtype=">i4"), "got >i4"),
        ("2-D", np.zeros((2, total), dtype=np.int32), "shape \\(2, "),
        ("0-D", np.zeros((), dtype=np.int32), "shape \\(\\)"),
        ("strided", np.zeros(2 * total, dtype=np.int32)[::2], "non-contiguous"),
        ("read-only", _read_only(total), "read-only"),
        ("misaligned", _misaligned(total), "misaligned"),
        ("one short", np.zeros(total - 1, dtype=np.int32), f"needs {total}"),
        ("empty", np.zeros(0, dtype=np.int32), f"needs {total}"),
    ]


def test_check_refuses_hostile_buffers() -> None:
    layout = StagingLayout(16, 4, 6, 3)
    for name, host, match in hostile_hosts(layout.total):
        with pytest.raises(ValueError, match=match):
            layout.check(host)
        assert name
    layout.check(np.zeros(layout.total, dtype=np.int32))
    layout.check(np.zeros(layout.total + 100, dtype=np.int32)[50:])


ARGS = (32, 4, 4, 16, 24)  # num_blocks, block_size, max_num_seqs, max_num_batched_tokens, mml


@pytest.mark.parametrize("Scheduler", IMPLS)
def test_schedule_into_refuses_hostile_buffers_and_layouts(Scheduler: Any) -> None:
    sched = Scheduler(*ARGS)
    sched.add_request(0, [1, 2, 3], 3)
    layout = StagingLayout(16, 4, 6)
    hostile = [(host, layout, match) for _, host, match in hostile_hosts(layout.total)]
    hostile += [
        (np.zeros(200, np.int32), StagingLayout(15, 4, 6), "below the scheduler's"),
        (np.zeros(200, np.int32), StagingLayout(16, 3, 6), "below the scheduler's"),
        (np.zeros(200, np.int32), StagingLayout(16, 4, 5), "below the scheduler's"),
    ]
    for host, lay, match in hostile:
        before = np.array(host, copy=True)
        with pytest.raises(ValueError, match=match):
            sched.schedule_into(host, lay)
        assert np.array_equal(np.asarray(host), before)  # nothing written
    for lay in (np.zeros(14, dtype=np.int64), None, {"input_ids": 0}):
        with pytest.raises(TypeError):
            sched.schedule_into(np.zeros(200, np.int32), lay)
    assert sched.debug_state()["waiting"] == [0]  # nothing was scheduled
    host = np.full(layout.total, -7, dtype=np.int32)
    batch = sched.schedule_into(host, layout)
    assert batch.num_tokens == 3
    assert host[: layout.total].tolist().count(-7) < layout.total


@pytest.mark.parametrize("Scheduler", IMPLS)
def test_schedule_into_writes_only_the_schedulers_fields(Scheduler: Any) -> None:
    """The model runner's fields (prefill_cu_seqlens, prefill_tiles, decode_order), the gaps and
    the unused tails are left as they were."""
    sched = Scheduler(*ARGS)
    for i in range(4):
        sched.add_request(i, list(range(1, 4 + i)), 2, temperature=0.5)
    offsets, pos = {}, 0
    for name in reversed(FIELDS):
        offsets[name] = pos + 3
        pos += 3 + StagingLayout(16, 4, 6).size(name)
    layout = StagingLayout(16, 4, 6, offsets=offsets)
    host = np.full(layout.total + 5, -7, dtype=np.int32)
    batch = sched.schedule_into(host, layout)
    used = {
        "input_ids": batch.num_tokens,
        "positions": batch.num_tokens,
        "slot_mapping": batch.num_tokens,
        "seq_lens": batch.num_seqs,
    }
    touched = np.zeros(len(host), dtype=bool)
    for name in FIELDS:
        start = layout.offset(name)
        if name in ("prefill_cu_seqlens", "prefill_tiles", "decode_order"):
            continue
        if name == "block_tables":  # [num_seqs, max_blocks] of rows max_blocks apart
            for row in range(batch.num_seqs):
                at = start + row * layout.max_blocks
                touched[at : at + batch.max_blocks] = True
            continue
        touched[start : start + used.get(name, batch.num_samples)] = True
    assert (host[~touched] == -7).all()
    assert (host[touched] != -7).all()


def _two_cores(args: tuple) -> tuple[Any, Any]:
    return CppScheduler(*args), CppScheduler(*args)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block_size=st.sampled_from([1, 2, 4, 16]),
    max_num_seqs=st.integers(1, 6),
    extra_tokens=st.integers(0, 40),
    max_model_len=st.integers(2, 80),
    slack=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2), st.integers(1, 3)),
    seed=st.integers(0, 2**32 - 1),
)
def test_twin_writer_matches_the_cores_staging(
    block_size: int,
    max_num_seqs: int,
    extra_tokens: int,
    max_model_len: int,
    slack: tuple[int, int, int, int],
    seed: int,
) -> None:
    """write_staging(batch) of the core's own Batch equals what the core's schedule_into
    writes, on random traces and random layouts (fields in random order, random gaps)."""
    rng = np.random.default_rng(seed)
    num_blocks = -(-max_model_len // block_size) + 2
    args = (num_blocks, block_size, max_num_seqs, max_num_seqs + extra_tokens, max_model_len)
    plain, staged = _two_cores(args)
    caps = (
        args[3] + slack[0],
        max_num_seqs + slack[1],
        -(-max_model_len // block_size) + slack[2],
        slack[3],
    )
    sizes = StagingLayout(*caps)
    offsets, pos = {}, 0
    for name in rng.permutation(FIELDS):
        pos += int(rng.integers(0, 4))
        offsets[str(name)] = pos
        pos += sizes.size(str(name))
    layout = StagingLayout(*caps, offsets=offsets)
    host_twin = rng.integers(-9, 9, size=layout.total + 3).astype(np.int32)
    host_core = host_twin.copy()
    next_id = 0
    for _ in range(30):
        for _ in range(int(rng.integers(0, 3))):
            length = int(rng.integers(1, max_model_len))
            kwargs = {
                "max_tokens": int(rng.integers(1, 10)),
                "temperature": float(rng.choice([0.0, 0.7])),
                "top_p": float(rng.choice([1.0, 0.8])),
                "top_k": int(rng.choice([0, 3])),
                "min_p": float(rng.choice([0.0, 0.1])),
                "seed": int(rng.integers(0, 2**63)),
            }
            prompt = rng.integers(0, 5, size=length).tolist()
            try:
                plain.add_request(next_id, prompt, **kwargs)
            except ValueError:
                continue  # too long for the pool
            staged.add_request(next_id, prompt, **kwargs)
            next_id += 1
        batch = plain.schedule()
        result = staged.schedule_into(host_core, layout)
        assert (batch is None) == (result is None)
        if batch is None:
            continue
        write_staging(batch, host_twin, layout)
        assert np.array_equal(host_twin, host_core)
        tokens = rng.integers(0, 5, size=batch.num_samples).astype(np.int64)
        assert plain.update(tokens) == staged.update(tokens)
