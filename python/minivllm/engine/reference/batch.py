"""The twin of the core's Batch writers: `Scheduler::write_batch` in csrc/scheduler.cc (the
Batch arrays) and the staging write of `Scheduler::schedule_into` (the layout is the core's,
minivllm._core.StagingLayout, csrc/include/minivllm/staging.h)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from minivllm.engine.reference.hash import sampling_uniforms_float32
from minivllm.engine.reference.sequence import Sequence

if TYPE_CHECKING:
    from minivllm._core import StagingLayout


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


def build_batch(rows: list[tuple[Sequence, int, int]], num_decodes: int, block_size: int) -> Batch:
    """The Batch of `rows` (seq, first new position, number of new tokens), in row order."""
    bs = block_size
    num_rows = len(rows)
    seq_lens = np.array([start + n for _, start, n in rows], dtype=np.int32)
    query_start_loc = np.zeros(num_rows + 1, dtype=np.int32)
    np.cumsum([n for _, _, n in rows], out=query_start_loc[1:])
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    blocks_per_row = [-(-(start + n) // bs) for _, start, n in rows]
    block_tables = np.full((num_rows, max(blocks_per_row)), -1, dtype=np.int32)
    sampled: list[tuple[int, Sequence, int]] = []  # (token row, seq, seq_len)
    for b, (seq, start, n) in enumerate(rows):
        # A placeholder input (async: a decode of last step's sample) names that sampled row.
        input_ids += (
            -(seq.last_sample_row + 1) if t is None else t for t in seq.token_ids[start : start + n]
        )
        positions += range(start, start + n)
        slot_mapping += (seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n))
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
        uniforms=sampling_uniforms_float32(
            np.array([s.seed for _, s, _ in sampled], dtype=np.uint64),
            np.array([end for _, _, end in sampled], dtype=np.uint64),
        ),
        all_greedy=all(s.is_greedy for _, s, _ in sampled),
        any_top_k_or_p=any(s.uses_top_k_or_p for _, s, _ in sampled),
        any_min_p=any(s.uses_min_p for _, s, _ in sampled),
    )


def write_staging(batch: Any, host: np.ndarray, layout: StagingLayout) -> None:
    """Copy a Batch's arrays (this twin's or the core's) into an int32 staging buffer at
    `layout`'s offsets: what schedule_into writes. The fields named like a Batch array are the
    scheduler's; float32 fields go in as bit patterns, the block table with row stride
    layout.max_blocks. Only the used prefix of each field is written."""
    floats = host.view(np.float32)
    for name in layout.fields:
        values = getattr(batch, name, None)
        if values is None:  # a field the model runner writes
            continue
        start = layout.offset(name)
        if name == "block_tables":
            stride = layout.max_blocks
            rows = host[start : start + batch.num_seqs * stride].reshape(batch.num_seqs, stride)
            rows[:, : batch.max_blocks] = values
        else:
            target = floats if layout.dtype(name) == "float32" else host
            target[start : start + len(values)] = values
