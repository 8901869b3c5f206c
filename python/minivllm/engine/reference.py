"""Pure-Python twin of the C++ host core (`minivllm._core.Scheduler`).

Same constructor, methods and outputs as the C++ core, written for clarity. It is the oracle in the
differential tests (tests/test_core_differential.py) and the baseline in
benchmarks/bench_host_overhead.py; `LLM(..., scheduler="python")` runs the engine on it. Any change
here must be mirrored in csrc/ (and the other way round): the tests compare every Batch array,
every update result and the whole block-manager state after every step.

Rules (docs/interfaces.md pins the API, dtypes and shapes):

Blocks. Every block is exactly one of: free (no hash, on a LIFO stack), cached-free (holds a
prefix hash, refcount 0, on an LRU list, oldest first) or referenced (refcount > 0, the number of
block-table occurrences). Allocation pops the free stack first (lowest id first at start) and only
then evicts the least recently freed cached block, dropping its hash. A finished or preempted
sequence frees its blocks in reverse table order, so its tail blocks are evicted before its head.

Prefix cache. Block j of a sequence, once all its tokens are scheduled, gets the hash
XXH64(int32 little-endian token ids of the block, seed=hash of block j-1), seed 0 for block 0.
It is registered (hash -> block) unless another block already holds that hash. At admission a
sequence walks its chain and takes a hit on block j only if hash, parent hash and every token id
match. Hits are taken only on full blocks that do not contain the sequence's last token, so at
least one token is always computed and no shared block is ever written: on a full-prompt hit
whose length is a multiple of block_size the final block is recomputed into a fresh block.

Admission (FCFS, head of the waiting queue only). A waiting sequence is admitted when token
budget remains, fewer than max_num_seqs are running, no preemption happened this step, and the
pool can give blocks for all its tokens (prompt, plus outputs after a preemption) beyond its
cache hits. Its prefill is then scheduled in chunks under the step's token budget.

Step. Decodes first (running order); a decode that needs a block and finds none preempts the
newest running sequence (possibly itself) until one is free. Preempted sequences drop their
blocks, go to the front of the waiting queue (oldest first) and later re-prefill prompt +
outputs, hitting their own cached blocks. Then partially prefilled running sequences continue
(running order), then waiting sequences are admitted. A prefill row samples only when it
reaches the end of the sequence's tokens.

Protocol. schedule() registers the hashes of blocks it fills, so the forward pass for a Batch must
run before the next schedule(). After a Batch with sampled rows, update() must be called before the
next schedule(); after a Batch with none it may be called with an empty array or skipped.
abort() between schedule() and update() is allowed: that sequence's sampled row is ignored.

Sampling. Every sampled row carries its request's temperature, top_p, top_k, min_p and one
uniform u = sampling_uniforms(seed, seq_len of the row) (SplitMix64 of SplitMix64(seed) ^ seq_len,
top 53 bits as a float64 in [0, 1), rounded to float32 and kept <= 1 - 2**-24), so a request's
draws depend only on its seed and its own length. The Batch also says whether every sampled row
is greedy (temperature 0 or top_k 1) and whether any sampling row uses top-k (0 < top_k <
vocab_size, any top_k > 0 when vocab_size is unknown) or top-p < 1, or min-p > 0; the comparisons
use the float32 values the Batch carries.

schedule_into(host, layout) is schedule() with the large arrays written into a caller's int32
staging buffer at the offsets of `layout` (see STAGING_LAYOUT below); it returns the same Batch.

Async scheduling (async_scheduling=True). schedule() may plan step N while Batch N-1 (with
sampled rows) awaits update(); update() always serves the oldest such Batch. Every sampled row
appends a placeholder token (None) at schedule time, which update() fills in order. A decode whose
input token is a placeholder gets input id -(j + 1): "sampled row j of the previous Batch", which
the model runner resolves on the device. A sequence whose placeholders will end it by length
gets no row; one that stops on a sampled token may have a wasted row in the next Batch, whose
token update() ignores. Blocks join the prefix cache only once every token in them is known; a
preempted sequence is readmitted only once its placeholders are filled. Batches without sampled
rows are not queued (update() with an empty array is accepted right after one). With
async_scheduling off, the placeholders are filled before any schedule(), so nothing changes.

Stop checks in update(), in order: eos (unless ignore_eos), stop_token_ids -> "stop" (the token is
kept); max_tokens outputs, prompt + outputs >= max_model_len -> "length".
"""

from __future__ import annotations

import math
import operator
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

INT32_MAX = 2**31 - 1
_BELOW_ONE = np.float32(1.0 - 2.0**-24)

# schedule_into's layout, in this order: int32-element offsets of the fields in the staging
# buffer, the block-table row stride, then the capacities (tokens, rows) the fields hold.
STAGING_LAYOUT = (
    "input_ids",
    "positions",
    "slot_mapping",
    "seq_lens",
    "block_tables",
    "block_tables_stride",
    "logits_indices",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "uniforms",
    "max_tokens",
    "max_seqs",
)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1, _MUL2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


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


def write_staging(batch: Batch, host: np.ndarray, layout: np.ndarray) -> None:
    """Copy a Batch's arrays into an int32 staging buffer at `layout` (STAGING_LAYOUT order;
    float fields as float32 bit patterns): what schedule_into writes."""
    at = dict(zip(STAGING_LAYOUT, layout.tolist()))
    floats = host.view(np.float32)
    t, s = batch.num_tokens, batch.num_samples
    for name in ("input_ids", "positions", "slot_mapping"):
        host[at[name] : at[name] + t] = getattr(batch, name)
    host[at["seq_lens"] : at["seq_lens"] + batch.num_seqs] = batch.seq_lens
    host[at["logits_indices"] : at["logits_indices"] + s] = batch.logits_indices
    host[at["top_k"] : at["top_k"] + s] = batch.top_k
    for name in ("temperature", "top_p", "min_p", "uniforms"):
        floats[at[name] : at[name] + s] = getattr(batch, name)
    stride, rows = at["block_tables_stride"], at["max_seqs"]
    tables = host[at["block_tables"] : at["block_tables"] + rows * stride].reshape(rows, stride)
    tables[: batch.num_seqs, : batch.max_blocks] = batch.block_tables


# ---------------------------------------------------------------------------------------------
# XXH64, from the public specification (github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md)
# ---------------------------------------------------------------------------------------------
_MASK64 = 2**64 - 1
_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK64


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * _P2) & _MASK64
    return (_rotl(acc, 31) * _P1) & _MASK64


def _merge_round(acc: int, val: int) -> int:
    acc ^= _round(0, val)
    return (acc * _P1 + _P4) & _MASK64


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of `data` with a 64-bit `seed`, as an unsigned int (pure Python)."""
    n = len(data)
    seed &= _MASK64
    i = 0
    if n >= 32:
        v1 = (seed + _P1 + _P2) & _MASK64
        v2 = (seed + _P2) & _MASK64
        v3 = seed
        v4 = (seed - _P1) & _MASK64
        while i + 32 <= n:
            a, b, c, d = struct.unpack_from("<4Q", data, i)
            v1, v2, v3, v4 = _round(v1, a), _round(v2, b), _round(v3, c), _round(v4, d)
            i += 32
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _MASK64
        for v in (v1, v2, v3, v4):
            h = _merge_round(h, v)
    else:
        h = (seed + _P5) & _MASK64
    h = (h + n) & _MASK64
    while i + 8 <= n:
        (lane,) = struct.unpack_from("<Q", data, i)
        h ^= _round(0, lane)
        h = (_rotl(h, 27) * _P1 + _P4) & _MASK64
        i += 8
    if i + 4 <= n:
        (lane,) = struct.unpack_from("<I", data, i)
        h ^= (lane * _P1) & _MASK64
        h = (_rotl(h, 23) * _P2 + _P3) & _MASK64
        i += 4
    while i < n:
        h ^= (data[i] * _P5) & _MASK64
        h = (_rotl(h, 11) * _P1) & _MASK64
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _MASK64
    h ^= h >> 29
    h = (h * _P3) & _MASK64
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
# Batch
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Batch:
    """One step's flat input arrays; decodes first, then prefill chunks (see interfaces.md)."""

    seq_ids: np.ndarray  # int64 [B]
    num_decodes: int
    input_ids: np.ndarray  # int32 [T]
    positions: np.ndarray  # int32 [T]
    slot_mapping: np.ndarray  # int32 [T]
    query_start_loc: np.ndarray  # int32 [B + 1]
    seq_lens: np.ndarray  # int32 [B]
    block_tables: np.ndarray  # int32 [B, max_blocks], padded with -1
    logits_indices: np.ndarray  # int32 [S]
    sample_seq_ids: np.ndarray  # int64 [S]
    temperature: np.ndarray  # float32 [S]
    top_p: np.ndarray  # float32 [S]
    top_k: np.ndarray  # int32 [S]
    min_p: np.ndarray  # float32 [S]
    uniforms: np.ndarray  # float32 [S]
    all_greedy: bool  # no sampled row samples
    any_top_k_or_p: bool  # some sampling row uses top-k or top-p
    any_min_p: bool  # some sampling row uses min-p

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_samples(self) -> int:
        return len(self.logits_indices)

    @property
    def max_blocks(self) -> int:
        return self.block_tables.shape[1]


# ---------------------------------------------------------------------------------------------
# Sequence
# ---------------------------------------------------------------------------------------------
class _Sequence:
    __slots__ = (
        "block_hashes",
        "block_table",
        "eos_token_ids",
        "ignore_eos",
        "is_greedy",
        "last_sample_row",
        "max_tokens",
        "min_p",
        "num_computed_tokens",
        "num_prefill_tokens",
        "num_prompt_tokens",
        "num_registered_blocks",
        "num_unknown",
        "seed",
        "seq_id",
        "stop_token_ids",
        "temperature",
        "token_ids",
        "top_k",
        "top_p",
        "uses_min_p",
        "uses_top_k_or_p",
    )

    def __init__(
        self,
        seq_id: int,
        prompt_token_ids: list[int],
        max_tokens: int,
        ignore_eos: bool,
        eos_token_ids: tuple[int, ...],
        stop_token_ids: tuple[int, ...],
        temperature: float,
        top_p: float,
        top_k: int,
        min_p: float,
        seed: int,
        vocab_size: int | None,
    ) -> None:
        self.seq_id = seq_id
        self.token_ids = prompt_token_ids  # prompt + outputs
        self.num_prompt_tokens = len(prompt_token_ids)
        self.max_tokens = max_tokens
        self.ignore_eos = ignore_eos
        self.eos_token_ids = eos_token_ids
        self.stop_token_ids = stop_token_ids
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.min_p = min_p
        self.seed = seed
        # The Batch flags, from the float32 values the Batch carries.
        t32, p32, m32 = np.float32(temperature), np.float32(top_p), np.float32(min_p)
        self.is_greedy = bool(t32 == 0 or top_k == 1)
        cuts_vocab = top_k > 0 and (vocab_size is None or top_k < vocab_size)
        self.uses_top_k_or_p = not self.is_greedy and (cuts_vocab or bool(p32 < 1))
        self.uses_min_p = not self.is_greedy and bool(m32 > 0)
        self.num_computed_tokens = 0  # tokens whose K/V are (being) written this admission
        self.num_prefill_tokens = 0  # tokens to compute before the first sample this admission
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # memo: hash of each full block of token_ids
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.num_unknown = 0  # trailing placeholders (None) in token_ids: sampled, not delivered
        self.last_sample_row = -1  # the sampled row of its newest placeholder in its Batch

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        return len(self.token_ids) - self.num_unknown

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prefill_tokens

    def block_hash(self, j: int, block_size: int) -> int:
        while len(self.block_hashes) <= j:
            k = len(self.block_hashes)
            parent = self.block_hashes[-1] if k else 0
            tokens = self.token_ids[k * block_size : (k + 1) * block_size]
            self.block_hashes.append(hash_block_tokens(parent, tokens))
        return self.block_hashes[j]


# ---------------------------------------------------------------------------------------------
# Block manager
# ---------------------------------------------------------------------------------------------
class BlockManager:
    """Reference counts, the free stack, the LRU list of cached-free blocks, the hash table."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_parent_hash = [0] * num_blocks
        self.block_token_ids: list[list[int] | None] = [None] * num_blocks
        self.free_block_ids = list(range(num_blocks - 1, -1, -1))  # stack: pop() gives 0 first
        self.cached_block_ids: OrderedDict[int, None] = OrderedDict()  # LRU, oldest first
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids) + len(self.cached_block_ids)

    def allocate(self) -> int:
        """A fresh block with refcount 1; evicts the least recently freed cached block if needed."""
        if self.free_block_ids:
            block_id = self.free_block_ids.pop()
        else:
            block_id, _ = self.cached_block_ids.popitem(last=False)
            del self.hash_to_block[self.block_hash[block_id]]
            self.block_hash[block_id] = None
            self.block_token_ids[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def take(self, block_id: int) -> None:
        """One more reference to a cached block (a prefix-cache hit)."""
        if self.ref_counts[block_id] == 0:
            del self.cached_block_ids[block_id]
        self.ref_counts[block_id] += 1

    def release(self, block_table: list[int]) -> None:
        for block_id in reversed(block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                if self.block_hash[block_id] is None:
                    self.free_block_ids.append(block_id)
                else:
                    self.cached_block_ids[block_id] = None

    def lookup(self, block_hash: int, parent_hash: int, token_ids: list[int]) -> int | None:
        block_id = self.hash_to_block.get(block_hash)
        if block_id is None:
            return None
        if self.block_parent_hash[block_id] != parent_hash:
            return None
        if self.block_token_ids[block_id] != token_ids:
            return None
        return block_id

    def register(
        self, block_id: int, block_hash: int, parent_hash: int, token_ids: list[int]
    ) -> None:
        if self.block_hash[block_id] is not None or block_hash in self.hash_to_block:
            return
        self.block_hash[block_id] = block_hash
        self.block_parent_hash[block_id] = parent_hash
        self.block_token_ids[block_id] = token_ids
        self.hash_to_block[block_hash] = block_id


# ---------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------
def _describe(value: Any) -> str:
    return str(value.dtype) if isinstance(value, np.ndarray) else type(value).__name__


def _check_int(name: str, value: Any) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


class Scheduler:
    """Continuous batching with chunked prefill, prefix caching and preemption by recompute."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
        async_scheduling: bool = False,
    ) -> None:
        num_blocks = _check_int("num_blocks", num_blocks)
        block_size = _check_int("block_size", block_size)
        max_num_seqs = _check_int("max_num_seqs", max_num_seqs)
        max_num_batched_tokens = _check_int("max_num_batched_tokens", max_num_batched_tokens)
        max_model_len = _check_int("max_model_len", max_model_len)
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_blocks * block_size > INT32_MAX:
            raise ValueError(
                f"num_blocks * block_size = {num_blocks * block_size} does not fit int32 slots"
            )
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                f"({max_num_seqs})"
            )
        if max_model_len < 2 or max_model_len > INT32_MAX:
            raise ValueError(f"max_model_len must be in [2, 2**31 - 1], got {max_model_len}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.async_scheduling = bool(async_scheduling)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.seqs: dict[int, _Sequence] = {}  # unfinished sequences by id
        # Sequences sampled by each Batch awaiting update(), oldest first (Batches without
        # sampled rows are not queued); an aborted or finished sequence's entry becomes None.
        self._pending: deque[list[_Sequence | None]] = deque()
        self._empty_batch_outstanding = False
        self._stats = {"num_preemptions": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0}

    # -- public API -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def add_request(
        self,
        seq_id: int,
        prompt_token_ids: Any,
        max_tokens: int,
        ignore_eos: bool = False,
        eos_token_ids: Iterable[int] = (),
        stop_token_ids: Iterable[int] = (),
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        vocab_size: int | None = None,
        seed: int = 0,
    ) -> None:
        seq_id = _check_int("seq_id", seq_id)
        seed = _check_int("seed", seed)
        max_tokens = _check_int("max_tokens", max_tokens)
        top_k = _check_int("top_k", top_k)
        temperature, top_p, min_p = float(temperature), float(top_p), float(min_p)
        eos = tuple(_check_int("eos_token_ids", t) for t in eos_token_ids)
        stop = tuple(_check_int("stop_token_ids", t) for t in stop_token_ids)
        if vocab_size is not None:
            vocab_size = _check_int("vocab_size", vocab_size)
        prompt = self._prompt_list(prompt_token_ids)

        if not (-(2**63) <= seq_id < 2**63):
            raise ValueError(f"seq_id {seq_id} does not fit int64")
        if seq_id in self.seqs:
            raise ValueError(f"seq_id {seq_id} is already in use by an unfinished request")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not (math.isfinite(temperature) and temperature >= 0.0):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        if not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not (0 <= top_k <= INT32_MAX):
            raise ValueError(f"top_k must be in [0, 2**31 - 1] (0 = off), got {top_k}")
        if not (0.0 <= min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if not (0 <= seed <= _MASK64):
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        if not prompt:
            raise ValueError("prompt_token_ids is empty")
        limit = INT32_MAX if vocab_size is None else vocab_size - 1
        for i, t in enumerate(prompt):
            if t < 0 or t > limit:
                bound = "2**31 - 1" if vocab_size is None else f"vocab_size {vocab_size}"
                raise ValueError(f"prompt token id {t} at index {i} is out of range [0, {bound})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt length {len(prompt)} >= max_model_len {self.max_model_len}")
        max_total = min(len(prompt) + max_tokens, self.max_model_len)
        # The last token is never fed back, so max_total - 1 tokens ever need a KV slot.
        max_blocks = -(-(max_total - 1) // self.block_size)
        if max_blocks > self.num_blocks:
            raise ValueError(
                f"request {seq_id} can grow to {max_total} tokens = {max_blocks} KV blocks, "
                f"more than the pool's num_blocks {self.num_blocks}"
            )
        seq = _Sequence(
            seq_id,
            prompt,
            max_tokens,
            bool(ignore_eos),
            eos,
            stop,
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            vocab_size,
        )
        self.seqs[seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> None:
        seq_id = _check_int("seq_id", seq_id)
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            raise ValueError(f"abort: unknown seq_id {seq_id}")
        if seq in self.running:
            self.running.remove(seq)
            self._free(seq)
        else:
            self.waiting.remove(seq)
        self._forget_pending(seq)

    def schedule(self) -> Batch | None:
        if len(self._pending) > (1 if self.async_scheduling else 0):
            raise RuntimeError(
                "schedule() called with two Batches awaiting update()"
                if self.async_scheduling
                else "schedule() called before update() for the previous Batch"
            )
        self._empty_batch_outstanding = False
        budget = self.max_num_batched_tokens
        rows: list[tuple[_Sequence, int, int]] = []  # (seq, first new position, num new tokens)
        preempted = False

        # 1. Decodes, in running order. max_num_batched_tokens >= max_num_seqs: they all fit.
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.is_prefilling or self._sure_to_stop(seq):
                i += 1
                continue
            if seq.num_computed_tokens // self.block_size == len(seq.block_table):
                victim = None
                while self.block_manager.num_free_blocks == 0:
                    victim = self.running.pop()
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                if victim is seq:  # it was the newest: nothing is left to schedule after it
                    break
                seq.block_table.append(self.block_manager.allocate())
            rows.append((seq, seq.num_computed_tokens, 1))
            i += 1
        num_decodes = len(rows)
        budget -= num_decodes

        # 2. Running sequences that are still prefilling, in running order.
        for seq in self.running:
            if budget == 0:
                break
            if seq.is_prefilling:
                n = min(seq.num_prefill_tokens - seq.num_computed_tokens, budget)
                rows.append((seq, seq.num_computed_tokens, n))
                budget -= n

        # 3. Admit waiting sequences (FCFS), unless this step had to preempt.
        while (
            self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted
        ):
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            n = min(seq.num_prefill_tokens - seq.num_computed_tokens, budget)
            rows.append((seq, seq.num_computed_tokens, n))
            budget -= n

        if not rows:
            return None
        batch = self._build_batch(rows, num_decodes)
        sampled: list[_Sequence | None] = []
        for seq, start, n in rows:
            seq.num_computed_tokens = start + n
            if self.enable_prefix_caching:
                self._register_full_blocks(seq)
            if start + n == seq.num_tokens:  # samples: a placeholder until update()
                seq.last_sample_row = len(sampled)
                seq.token_ids.append(None)
                seq.num_unknown += 1
                sampled.append(seq)
        if sampled:
            self._pending.append(sampled)
        else:
            self._empty_batch_outstanding = True
        return batch

    def schedule_into(self, host: np.ndarray, layout: np.ndarray) -> Batch | None:
        """schedule(), then its arrays copied into `host` at the offsets of `layout`."""
        if not isinstance(host, np.ndarray) or host.dtype != np.int32:
            raise ValueError(f"host must be a numpy int32 array, got {_describe(host)}")
        if not isinstance(layout, np.ndarray) or layout.dtype != np.int64:
            raise ValueError(f"layout must be a numpy int64 array, got {_describe(layout)}")
        if host.ndim != 1 or not host.flags.c_contiguous or not host.flags.writeable:
            raise ValueError("host must be a writeable, contiguous 1-D int32 array")
        if layout.shape != (len(STAGING_LAYOUT),):
            raise ValueError(f"layout must have {len(STAGING_LAYOUT)} entries")
        at = dict(zip(STAGING_LAYOUT, layout.tolist()))
        width = -(-self.max_model_len // self.block_size)
        stride, max_tokens, max_seqs = at["block_tables_stride"], at["max_tokens"], at["max_seqs"]
        if (
            max_tokens < self.max_num_batched_tokens
            or max_seqs < self.max_num_seqs
            or stride < width
        ):
            raise ValueError(
                f"layout capacities (tokens {max_tokens}, rows {max_seqs}, block-table stride "
                f"{stride}) are below the scheduler's ({self.max_num_batched_tokens}, "
                f"{self.max_num_seqs}, {width})"
            )
        spans = [("block_tables", max_seqs * stride)]
        spans += [(f, max_tokens) for f in ("input_ids", "positions", "slot_mapping")]
        spans += [
            (f, max_seqs)
            for f in ("seq_lens", "logits_indices", "temperature", "top_p", "top_k", "min_p")
        ]
        spans.append(("uniforms", max_seqs))
        if any(at[f] < 0 or at[f] + n > len(host) for f, n in spans):
            raise ValueError("layout places a field outside the host buffer")
        batch = self.schedule()
        if batch is not None:
            write_staging(batch, host, layout)
        return batch

    def update(self, sampled_token_ids: np.ndarray) -> list[tuple[int, str, list[int]]]:
        if not isinstance(sampled_token_ids, np.ndarray) or sampled_token_ids.dtype != np.int64:
            raise ValueError(
                "sampled_token_ids must be a numpy int64 array, got "
                f"{getattr(sampled_token_ids, 'dtype', type(sampled_token_ids).__name__)}"
            )
        if sampled_token_ids.ndim != 1:
            raise ValueError(f"sampled_token_ids must be 1-D, got shape {sampled_token_ids.shape}")
        if not self._pending:
            if not self._empty_batch_outstanding:
                raise RuntimeError("update() called without a scheduled Batch")
            if len(sampled_token_ids) != 0:
                raise ValueError(
                    f"sampled_token_ids has shape ({len(sampled_token_ids)},), expected (0,), "
                    "one per Batch.sample_seq_ids row"
                )
            self._empty_batch_outstanding = False
            return []
        if len(sampled_token_ids) != len(self._pending[0]):
            raise ValueError(
                f"sampled_token_ids has shape ({len(sampled_token_ids)},), expected "
                f"({len(self._pending[0])},), one per Batch.sample_seq_ids row"
            )
        tokens = sampled_token_ids.tolist()
        for t in tokens:
            if t < 0 or t > INT32_MAX:
                raise ValueError(f"sampled token id {t} is out of range [0, 2**31 - 1]")
        pending = self._pending.popleft()
        if not self._pending:
            self._empty_batch_outstanding = False

        finished: list[tuple[int, str, list[int]]] = []
        for seq, token in zip(pending, tokens):
            if seq is None:  # aborted or finished after schedule()
                continue
            pos = seq.num_known_tokens  # the oldest placeholder gets the token
            seq.token_ids[pos] = token
            seq.num_unknown -= 1
            reason = self._stop_reason(seq, token)
            if reason is not None:
                finished.append(
                    (seq.seq_id, reason, seq.token_ids[seq.num_prompt_tokens : pos + 1])
                )
                self._free(seq)
                del self.seqs[seq.seq_id]
                self._forget_pending(seq)  # a row in a later Batch is wasted: token ignored
            elif self.enable_prefix_caching and seq.block_table:
                self._register_full_blocks(seq)  # blocks whose last token just became known
        if finished:
            self.running = [seq for seq in self.running if seq.seq_id in self.seqs]
            self.waiting = deque(seq for seq in self.waiting if seq.seq_id in self.seqs)
        return finished

    def debug_state(self) -> dict[str, Any]:
        """A snapshot of the internal state, for the invariant and differential tests."""
        bm = self.block_manager
        return {
            "ref_counts": list(bm.ref_counts),
            "block_hashes": list(bm.block_hash),
            "free_block_ids": list(bm.free_block_ids),
            "cached_block_ids": list(bm.cached_block_ids),
            "hash_to_block": dict(bm.hash_to_block),
            "waiting": [s.seq_id for s in self.waiting],
            "running": [s.seq_id for s in self.running],
            "block_tables": {s.seq_id: list(s.block_table) for s in self.seqs.values()},
            "num_computed_tokens": {s.seq_id: s.num_computed_tokens for s in self.seqs.values()},
        }

    # -- internals ------------------------------------------------------------------------------
    @staticmethod
    def _prompt_list(prompt_token_ids: Any) -> list[int]:
        if isinstance(prompt_token_ids, np.ndarray):
            if prompt_token_ids.dtype.kind not in "iu" or prompt_token_ids.ndim != 1:
                raise ValueError(
                    "prompt_token_ids must be a 1-D integer array, got "
                    f"{prompt_token_ids.dtype} of shape {prompt_token_ids.shape}"
                )
            return prompt_token_ids.tolist()
        return [_check_int("prompt_token_ids", t) for t in prompt_token_ids]

    def _stop_reason(self, seq: _Sequence, token: int) -> str | None:
        """Counted up to the token just delivered (later placeholders are not outputs yet)."""
        num_tokens = seq.num_known_tokens
        if not seq.ignore_eos and token in seq.eos_token_ids:
            return "stop"
        if token in seq.stop_token_ids:
            return "stop"
        if num_tokens - seq.num_prompt_tokens >= seq.max_tokens:
            return "length"
        if num_tokens >= self.max_model_len:
            return "length"
        return None

    def _sure_to_stop(self, seq: _Sequence) -> bool:
        """Once its placeholders land, length alone ends it: it gets no decode row."""
        return seq.num_unknown > 0 and (
            seq.num_tokens - seq.num_prompt_tokens >= seq.max_tokens
            or seq.num_tokens >= self.max_model_len
        )

    def _forget_pending(self, seq: _Sequence) -> None:
        for batch in self._pending:
            for i, s in enumerate(batch):
                if s is seq:
                    batch[i] = None

    def _admit(self, seq: _Sequence) -> bool:
        """Take the prefix-cache hits and allocate blocks for all of seq's tokens, if they fit.
        A preempted sequence waits until its placeholders are filled."""
        if seq.num_unknown:
            return False
        bm = self.block_manager
        bs = self.block_size
        hits: list[int] = []
        if self.enable_prefix_caching:
            parent = 0
            for j in range((seq.num_tokens - 1) // bs):  # never the block of the last token
                h = seq.block_hash(j, bs)
                block_id = bm.lookup(h, parent, seq.token_ids[j * bs : (j + 1) * bs])
                if block_id is None:
                    break
                hits.append(block_id)
                parent = h
        num_new = -(-seq.num_tokens // bs) - len(hits)
        num_hits_free = sum(1 for b in hits if bm.ref_counts[b] == 0)
        if bm.num_free_blocks - num_hits_free < num_new:
            return False
        for block_id in hits:
            bm.take(block_id)
        seq.block_table = hits + [bm.allocate() for _ in range(num_new)]
        seq.num_computed_tokens = len(hits) * bs
        seq.num_prefill_tokens = seq.num_tokens
        seq.num_registered_blocks = len(hits)
        if self.enable_prefix_caching:
            self._stats["prefix_cache_queries"] += seq.num_tokens
            self._stats["prefix_cache_hits"] += len(hits) * bs
        return True

    def _register_full_blocks(self, seq: _Sequence) -> None:
        bs = self.block_size
        num_full = min(seq.num_computed_tokens, seq.num_known_tokens) // bs
        for j in range(seq.num_registered_blocks, num_full):
            parent = seq.block_hash(j - 1, bs) if j else 0
            self.block_manager.register(
                seq.block_table[j],
                seq.block_hash(j, bs),
                parent,
                seq.token_ids[j * bs : (j + 1) * bs],
            )
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def _free(self, seq: _Sequence) -> None:
        self.block_manager.release(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_prefill_tokens = 0
        seq.num_registered_blocks = 0

    def _preempt(self, seq: _Sequence) -> None:
        self._free(seq)
        self.waiting.appendleft(seq)
        self._stats["num_preemptions"] += 1

    def _build_batch(self, rows: list[tuple[_Sequence, int, int]], num_decodes: int) -> Batch:
        bs = self.block_size
        num_rows = len(rows)
        seq_lens = np.array([start + n for _, start, n in rows], dtype=np.int32)
        query_start_loc = np.zeros(num_rows + 1, dtype=np.int32)
        np.cumsum([n for _, _, n in rows], out=query_start_loc[1:])
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        blocks_per_row = [-(-(start + n) // bs) for _, start, n in rows]
        block_tables = np.full((num_rows, max(blocks_per_row)), -1, dtype=np.int32)
        sampled: list[tuple[int, _Sequence, int]] = []  # (token row, seq, seq_len)
        for b, (seq, start, n) in enumerate(rows):
            # A placeholder input (async: a decode of last step's sample) names that sampled row.
            input_ids += (
                -(seq.last_sample_row + 1) if t is None else t
                for t in seq.token_ids[start : start + n]
            )
            positions += range(start, start + n)
            slot_mapping += (
                seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)
            )
            block_tables[b, : blocks_per_row[b]] = seq.block_table[: blocks_per_row[b]]
            if start + n == seq.num_tokens:
                sampled.append((int(query_start_loc[b + 1]) - 1, seq, start + n))
        return Batch(
            seq_ids=np.array([seq.seq_id for seq, _, _ in rows], dtype=np.int64),
            num_decodes=num_decodes,
            input_ids=np.array(input_ids, dtype=np.int32),
            positions=np.array(positions, dtype=np.int32),
            slot_mapping=np.array(slot_mapping, dtype=np.int32),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            logits_indices=np.array([r for r, _, _ in sampled], dtype=np.int32),
            sample_seq_ids=np.array([s.seq_id for _, s, _ in sampled], dtype=np.int64),
            temperature=np.array([s.temperature for _, s, _ in sampled], dtype=np.float32),
            top_p=np.array([s.top_p for _, s, _ in sampled], dtype=np.float32),
            top_k=np.array([s.top_k for _, s, _ in sampled], dtype=np.int32),
            min_p=np.array([s.min_p for _, s, _ in sampled], dtype=np.float32),
            uniforms=np.minimum(
                sampling_uniforms(
                    np.array([s.seed for _, s, _ in sampled], dtype=np.uint64),
                    np.array([end for _, _, end in sampled], dtype=np.uint64),
                ).astype(np.float32),
                _BELOW_ONE,
            ),
            all_greedy=all(s.is_greedy for _, s, _ in sampled),
            any_top_k_or_p=any(s.uses_top_k_or_p for _, s, _ in sampled),
            any_min_p=any(s.uses_min_p for _, s, _ in sampled),
        )
