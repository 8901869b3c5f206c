"""The twin of csrc/hash.cc: XXH64, the prefix-cache block hash, and the sampling uniforms."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np

# ---------------------------------------------------------------------------------------------
# XXH64, from the public specification (github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md)
# ---------------------------------------------------------------------------------------------
MASK64 = 2**64 - 1
_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & MASK64


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * _P2) & MASK64
    return (_rotl(acc, 31) * _P1) & MASK64


def _merge_round(acc: int, val: int) -> int:
    acc ^= _round(0, val)
    return (acc * _P1 + _P4) & MASK64


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of `data` with a 64-bit `seed`, as an unsigned int (pure Python)."""
    n = len(data)
    seed &= MASK64
    i = 0
    if n >= 32:
        v1 = (seed + _P1 + _P2) & MASK64
        v2 = (seed + _P2) & MASK64
        v3 = seed
        v4 = (seed - _P1) & MASK64
        while i + 32 <= n:
            a, b, c, d = struct.unpack_from("<4Q", data, i)
            v1, v2, v3, v4 = _round(v1, a), _round(v2, b), _round(v3, c), _round(v4, d)
            i += 32
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & MASK64
        for v in (v1, v2, v3, v4):
            h = _merge_round(h, v)
    else:
        h = (seed + _P5) & MASK64
    h = (h + n) & MASK64
    while i + 8 <= n:
        (lane,) = struct.unpack_from("<Q", data, i)
        h ^= _round(0, lane)
        h = (_rotl(h, 27) * _P1 + _P4) & MASK64
        i += 8
    if i + 4 <= n:
        (lane,) = struct.unpack_from("<I", data, i)
        h ^= (lane * _P1) & MASK64
        h = (_rotl(h, 23) * _P2 + _P3) & MASK64
        i += 4
    while i < n:
        h ^= (data[i] * _P5) & MASK64
        h = (_rotl(h, 11) * _P1) & MASK64
        i += 1
    h ^= h >> 33
    h = (h * _P2) & MASK64
    h ^= h >> 29
    h = (h * _P3) & MASK64
    h ^= h >> 32
    return h


try:  # the same function, in C; the pure-Python one above is checked against it in the tests
    from xxhash import xxh64_intdigest as _fast_xxh64
except ImportError:  # pragma: no cover
    _fast_xxh64 = xxh64


def hash_block_tokens(parent_hash: int, token_ids: Iterable[int]) -> int:
    """Prefix-cache hash of one full block: XXH64(int32 LE token ids, seed=parent_hash)."""
    data = np.asarray(list(token_ids), dtype="<i4").tobytes()
    return _fast_xxh64(data, parent_hash)


# ---------------------------------------------------------------------------------------------
# Sampling uniforms
# ---------------------------------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1, _MUL2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_BELOW_ONE = np.float32(1.0 - 2.0**-24)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on 1-d uint64 arrays (array arithmetic wraps modulo 2**64)."""
    x = x + _GOLDEN
    x ^= x >> _S30
    x *= _MUL1
    x ^= x >> _S27
    x *= _MUL2
    x ^= x >> _S31
    return x


def sampling_uniforms(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) per row from (seed, counter), as float64 (the Batch carries it
    rounded to float32 and kept <= 1 - 2**-24)."""
    h = _splitmix64(_splitmix64(seeds.astype(np.uint64)) ^ counters.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sampling_uniforms_float32(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """What the Batch carries: sampling_uniforms as float32, kept <= 1 - 2**-24."""
    return np.minimum(sampling_uniforms(seeds, counters).astype(np.float32), _BELOW_ONE)
