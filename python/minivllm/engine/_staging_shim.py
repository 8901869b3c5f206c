"""TEMPORARY stand-in for minivllm._core.StagingLayout until the core exports it (deleted then)."""

from __future__ import annotations

import numpy as np

STAGING_FIELDS = (
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
_OLD_ORDER = (
    "input_ids", "positions", "slot_mapping", "seq_lens", "block_tables", "block_tables_stride",
    "logits_indices", "temperature", "top_p", "top_k", "min_p", "uniforms", "max_tokens",
    "max_seqs",
)  # fmt: skip


class StagingLayout:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, max_tiles: int = 1):
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.max_blocks, self.max_tiles = max_blocks, max_tiles
        extents = {
            "tokens": max_tokens,
            "seqs": max_seqs,
            "seqs+1": max_seqs + 1,
            "block_tables": max_seqs * max_blocks,
            "tiles": max_tiles,
        }
        self._fields = {}
        pos = 0
        for name, dtype, extent in STAGING_FIELDS:
            self._fields[name] = (pos, extents[extent], dtype, extent)
            pos += extents[extent]
        self.total = pos
        self.fields = tuple(self._fields)

    def offset(self, name: str) -> int:
        return self._fields[name][0]

    def size(self, name: str) -> int:
        return self._fields[name][1]

    def dtype(self, name: str) -> str:
        return self._fields[name][2]

    def legacy_array(self) -> np.ndarray:
        extra = {
            "block_tables_stride": self.max_blocks,
            "max_tokens": self.max_tokens,
            "max_seqs": self.max_seqs,
        }
        return np.array([extra.get(f, None) or self.offset(f) for f in _OLD_ORDER], np.int64)
