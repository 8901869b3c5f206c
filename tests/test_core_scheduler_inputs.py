"""What the scheduler refuses and what it accepts, against the C++ core and its Python twin: bad
requests, bad update() arrays and constructor arguments (ValueError, nothing changes), wrong types
(TypeError), the largest request that fits, reused ids, the array and integer types it takes, and
hypothesis-drawn arguments that must never break the core's invariants."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from scheduler_testing import I32, assert_array, run_to_end
from test_core_invariants import IMPLS, check_invariants

pytestmark = pytest.mark.parametrize("Scheduler", IMPLS)


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
