"""XXH64 (C++ core and the twin's pure-Python copy) against the xxhash package."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st
from minivllm import _core
from minivllm.engine import reference

SEEDS = [0, 1, 0x9E3779B185EBCA87, 2**64 - 1]
# Lengths around every code path: < 4, 4..7, 8..31, exactly 32, stripes plus each tail.
LENGTHS = [0, 1, 3, 4, 7, 8, 15, 31, 32, 33, 36, 40, 63, 64, 100, 1024, 4099]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("length", LENGTHS)
def test_xxh64_matches_xxhash(length: int, seed: int) -> None:
    data = np.random.default_rng(length).integers(0, 256, size=length, dtype=np.uint8).tobytes()
    expected = xxhash.xxh64_intdigest(data, seed)
    assert _core.xxh64(data, seed) == expected
    assert reference.xxh64(data, seed) == expected


def test_xxh64_known_vectors() -> None:
    # Published XXH64 values.
    assert _core.xxh64(b"") == 0xEF46DB3751D8E999
    assert _core.xxh64(b"a") == 0xD24EC4F1A98C6E5B
    assert _core.xxh64(b"abc") == 0x44BC2CF5AD770999


@given(data=st.binary(max_size=300), seed=st.integers(0, 2**64 - 1))
def test_xxh64_random(data: bytes, seed: int) -> None:
    assert _core.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed)


@given(
    parent=st.integers(0, 2**64 - 1),
    tokens=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=300),
)
def test_block_hash_chain_agrees(parent: int, tokens: list[int]) -> None:
    expected = xxhash.xxh64_intdigest(np.array(tokens, dtype="<i4").tobytes(), parent)
    assert _core.hash_block_tokens(parent, tokens) == expected
    assert _core.hash_block_tokens(parent, np.array(tokens, dtype=np.int64)) == expected
    assert reference.hash_block_tokens(parent, tokens) == expected


def test_block_hash_depends_on_parent() -> None:
    tokens = [1, 2, 3, 4]
    assert _core.hash_block_tokens(0, tokens) != _core.hash_block_tokens(1, tokens)
