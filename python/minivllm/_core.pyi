"""Type stubs for the C++ host core `minivllm._core` (csrc/). See docs/interfaces.md."""

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

def version() -> str: ...
def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of `data` with a 64-bit seed (unsigned result)."""

def hash_block_tokens(parent_hash: int, token_ids: Sequence[int] | npt.NDArray[np.integer]) -> int:
    """Prefix-cache hash of one full block: XXH64(int32 LE token ids, seed=parent_hash)."""

STAGING_FIELDS: tuple[tuple[str, str, str], ...]
"""The staging buffer's fields in buffer order: (name, dtype, extent). dtype is "int32" or
"float32" (float32 bit patterns in the int32 buffer); extent is "tokens", "seqs", "seqs+1",
"block_tables" (seqs * max_blocks, row-major, row stride max_blocks) or "tiles". The scheduler
writes input_ids .. uniforms except prefill_cu_seqlens; the model runner writes
prefill_cu_seqlens, prefill_tiles and decode_order (csrc/include/minivllm/staging.h)."""

class StagingLayout:
    """Where each STAGING_FIELDS field sits in an int32 staging buffer (offsets in elements).

    Without `offsets` the fields are packed back to back in buffer order from offset 0; with it,
    every field's offset is given (any order, gaps allowed). Capacities must be >= 1; a missing
    or unknown field, a negative offset, overlapping fields, or a layout whose end does not fit
    int64 raise ValueError (a value of the wrong type, TypeError)."""

    def __init__(
        self,
        max_tokens: int,
        max_seqs: int,
        max_blocks: int,
        max_tiles: int = 1,
        offsets: Mapping[str, int] | None = None,
    ) -> None: ...
    @property
    def fields(self) -> tuple[str, ...]: ...
    def dtype(self, name: str) -> str: ...  # unknown name -> ValueError (so for all four)
    def extent(self, name: str) -> str: ...
    def offset(self, name: str) -> int: ...
    def size(self, name: str) -> int: ...  # int32 elements
    @property
    def total(self) -> int: ...  # one past the end of the last field
    @property
    def max_tokens(self) -> int: ...
    @property
    def max_seqs(self) -> int: ...
    @property
    def max_blocks(self) -> int: ...  # the block-table row stride
    @property
    def max_tiles(self) -> int: ...
    def check(self, host: object) -> None:
        """ValueError unless `host` is a writeable, aligned, C-contiguous, 1-D numpy int32
        array with len(host) >= total: the one validation of a staging buffer."""

class Batch:
    """One step's flat input arrays; decodes first, then prefill chunks."""

    @property
    def seq_ids(self) -> npt.NDArray[np.int64]: ...  # [B]
    @property
    def num_decodes(self) -> int: ...
    @property
    def input_ids(self) -> npt.NDArray[np.int32]: ...  # [T]
    @property
    def positions(self) -> npt.NDArray[np.int32]: ...  # [T]
    @property
    def slot_mapping(self) -> npt.NDArray[np.int32]: ...  # [T]
    @property
    def query_start_loc(self) -> npt.NDArray[np.int32]: ...  # [B + 1]
    @property
    def seq_lens(self) -> npt.NDArray[np.int32]: ...  # [B]
    @property
    def block_tables(self) -> npt.NDArray[np.int32]: ...  # [B, max_blocks], -1 padded
    @property
    def logits_indices(self) -> npt.NDArray[np.int32]: ...  # [S]
    @property
    def sample_seq_ids(self) -> npt.NDArray[np.int64]: ...  # [S]
    @property
    def temperature(self) -> npt.NDArray[np.float32]: ...  # [S]
    @property
    def top_p(self) -> npt.NDArray[np.float32]: ...  # [S]
    @property
    def top_k(self) -> npt.NDArray[np.int32]: ...  # [S]
    @property
    def min_p(self) -> npt.NDArray[np.float32]: ...  # [S]
    @property
    def uniforms(self) -> npt.NDArray[np.float32]: ...  # [S] from (seed, seq_len)
    @property
    def all_greedy(self) -> bool: ...
    @property
    def any_top_k_or_p(self) -> bool: ...
    @property
    def any_min_p(self) -> bool: ...
    @property
    def num_seqs(self) -> int: ...  # B
    @property
    def num_tokens(self) -> int: ...  # T
    @property
    def num_samples(self) -> int: ...  # S
    @property
    def max_blocks(self) -> int: ...

class StagedBatch:
    """What schedule_into returns: the Batch's scalars and small arrays; the rest went into the
    caller's staging buffer."""

    num_seqs: int
    num_tokens: int
    num_samples: int
    max_blocks: int
    num_decodes: int
    all_greedy: bool
    any_top_k_or_p: bool
    any_min_p: bool
    seq_ids: npt.NDArray[np.int64]  # [B]
    sample_seq_ids: npt.NDArray[np.int64]  # [S]
    query_start_loc: npt.NDArray[np.int32]  # [B + 1]

class Scheduler:
    """Ints that do not fit int64 raise ValueError naming the argument; see docs/interfaces.md."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
        async_scheduling: bool = False,
    ) -> None: ...
    def add_request(
        self,
        seq_id: int,
        prompt_token_ids: Sequence[int] | npt.NDArray[np.integer],
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
        skip_prefix_cache: bool = False,
    ) -> None: ...
    def schedule(self) -> Batch | None: ...
    def schedule_into(
        self, host: npt.NDArray[np.int32], layout: StagingLayout
    ) -> StagedBatch | None:
        """schedule(), with the scheduler's fields written into `host` at `layout`:
        layout.check(host), and the layout's capacities must cover the scheduler's
        (max_num_batched_tokens, max_num_seqs, ceil(max_model_len / block_size)), else
        ValueError with nothing scheduled."""
    def update(
        self, sampled_token_ids: npt.NDArray[np.int64]
    ) -> list[tuple[int, str, list[int]]]: ...
    def abort(self, seq_id: int) -> None: ...
    def reset_prefix_cache(self) -> int: ...  # drops every prefix hash; returns how many
    def has_unfinished(self) -> bool: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def stats(self) -> dict[str, int]: ...
    def debug_state(self) -> dict[str, object]: ...
