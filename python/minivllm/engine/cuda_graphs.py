"""CUDA graphs for decode-only steps, and for steps with prefill of one fixed token count.

A decode step launches a few hundred small kernels; replaying one captured graph instead costs a
single launch, which is what keeps the GPU busy while the host prepares the next step. Graphs are
captured per batch-size bucket, largest first so that every smaller graph fits in the memory pool
the largest one made. A step of n decodes replays the smallest bucket >= n; the padded rows have
seq_len 0 and slot -1, so they read no KV and write nowhere.

A step with prefill launches the same few hundred kernels with much larger shapes, and Python
takes longer to launch them than the GPU to run them. With `mixed_tokens` set, more graphs run
such steps: one per token count from mixed_tokens down by halves to MIN_MIXED_TOKENS, so a step
is padded to at most twice its tokens (a lone short prompt does not pay for a full step), and a
step of fewer tokens to MIN_MIXED_TOKENS (launched eagerly, its few hundred kernels would cost the
host tens of milliseconds; the padded GPU work costs less than one). Every
row is a "prefill" row of the flash kernel (a decode is a one-token query), whose fixed grid walks
a per-step tile table; padding tokens belong to no row and have slot -1.

The graphs read their inputs from the model runner's persistent device buffers (fixed addresses),
so a replay needs no copy beyond the one upload the runner does anyway. `plan` decides which graph
(if any) runs a step and writes what that graph reads besides the scheduler's arrays into the
staging buffer: padding rows, the decode rows' order, the mixed step's tile table.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from minivllm.engine.staging import BatchLike, StagingBuffers
from minivllm.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


# The smallest mixed graph, which also runs every smaller step with prefill: a lone one-token
# prompt launched eagerly took 25-40 ms of host time against ~1.5 ms for this graph (H100).
MIN_MIXED_TOKENS = 128


def mixed_graph_sizes(max_tokens: int) -> list[int]:
    """Token counts of the mixed graphs, ascending: max_tokens and its halves down to
    MIN_MIXED_TOKENS (max_tokens alone when it is smaller)."""
    sizes = [max_tokens]
    while sizes[-1] // 2 >= MIN_MIXED_TOKENS:
        sizes.append(sizes[-1] // 2)
    return sorted(sizes)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Buckets 1, 2, 4, 8, then every 16 up to max_num_seqs (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    sizes.append(max_num_seqs)
    return sorted(set(sizes))


@dataclass(frozen=True)
class GraphInputs:
    """Fixed-address device views the captured graphs read (the runner's whole buffers)."""

    input_ids: torch.Tensor  # [max_tokens] int32
    positions: torch.Tensor  # [max_tokens] int32
    slot_mapping: torch.Tensor  # [max_tokens] int32
    seq_lens: torch.Tensor  # [max_seqs] int32
    block_tables: torch.Tensor  # [max_seqs, max_blocks] int32
    cu_seqlens: torch.Tensor  # [max_seqs + 1] int32: query_start_loc of a mixed step
    tiles: torch.Tensor  # [max_tiles] int32: a mixed step's tile table
    decode_order: torch.Tensor  # [max_seqs] int32: a decode step's rows, longest context first

    @classmethod
    def from_staging(cls, staging: StagingBuffers) -> GraphInputs:
        """The whole of every field the graphs read, on the device."""
        return cls(
            input_ids=staging.dev("input_ids"),
            positions=staging.dev("positions"),
            slot_mapping=staging.dev("slot_mapping"),
            seq_lens=staging.dev("seq_lens"),
            block_tables=staging.dev_block_tables,
            cu_seqlens=staging.dev("prefill_cu_seqlens"),
            tiles=staging.dev("prefill_tiles"),
            decode_order=staging.dev("decode_order"),
        )


ForwardFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


class CudaGraphRunner:
    """Captures `forward(input_ids, positions, meta) -> hidden` for each decode batch bucket,
    and with `mixed_tokens` for steps with prefill of up to that many tokens. A mixed graph's
    tile table counts `tokens_per_tile(n)` query tokens a tile: what the prefill kernel takes for
    a launch of n tokens (an int: the same for every size)."""

    def __init__(
        self,
        forward: ForwardFn,
        inputs: GraphInputs,
        max_num_seqs: int,
        mixed_tokens: int = 0,
        tokens_per_tile: int | Callable[[int], int] = 1,
    ):
        self.forward = forward
        self.inputs = inputs
        self.max_num_seqs = max_num_seqs
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.mixed_tokens = mixed_tokens
        self.mixed_sizes = mixed_graph_sizes(mixed_tokens) if mixed_tokens else []
        self._tokens_per_tile = tokens_per_tile
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.mixed_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.mixed_outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def tokens_per_tile(self, num_tokens: int) -> int:
        tpt = self._tokens_per_tile
        return tpt if isinstance(tpt, int) else tpt(num_tokens)

    def mixed_bucket(self, num_tokens: int) -> int:
        """The mixed graph a step with prefill of num_tokens tokens replays: the smallest that
        holds it; 0: eager (more tokens than the largest)."""
        i = bisect.bisect_left(self.mixed_sizes, num_tokens)
        return self.mixed_sizes[i] if i < len(self.mixed_sizes) else 0

    def _num_tiles(self, size: int) -> int:
        """Tile-table entries a mixed graph of `size` tokens has (its grid): one per query tile
        of size tokens, plus one per row for the partial tiles."""
        return -(-size // self.tokens_per_tile(size)) + self.max_num_seqs

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def bucket(self, num_decodes: int) -> int:
        """The captured batch size a step of num_decodes decodes replays."""
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, num_decodes)]

    def plan(self, batch: BatchLike, staging: StagingBuffers) -> tuple[int, int]:
        """(decode bucket, mixed token count) of the graph that runs this step, 0 for none; what
        that graph reads besides the scheduler's arrays is written into `staging` here."""
        num_tokens, nd, num_rows = batch.num_tokens, batch.num_decodes, batch.num_seqs
        if nd == num_rows == num_tokens and 0 < nd <= self.max_batch_size:
            bs = self.bucket(nd)
            seq_lens = staging.host_view("seq_lens")
            if bs > nd:
                # Padded graph rows: seq_len 0 and slot -1 read no KV and write nowhere.
                staging.neutralise_tokens(nd, bs)
                seq_lens[nd:bs] = 0
            # Longest context first (padding last): the decode kernel's programs take the rows in
            # this order, so the longest rows do not form the grid's tail.
            staging.host_view("decode_order")[:bs] = np.argsort(-seq_lens[:bs], kind="stable")
            return bs, 0
        # A step with prefill replays the smallest mixed graph that holds it.
        mixed = self.mixed_bucket(num_tokens) if num_tokens > nd else 0
        if not mixed:
            return 0, 0
        # Every row is a "prefill" row (a decode is a one-token query) named by the tile table;
        # padding tokens past the step have no row and write no KV.
        from minivllm.kernels.flash_prefill import build_tile_table

        qsl = batch.query_start_loc
        cu = staging.host_view("prefill_cu_seqlens")
        cu[: num_rows + 1] = qsl
        cu[num_rows + 1 :] = num_tokens  # empty rows
        seq_lens = staging.host_view("seq_lens")
        seq_lens[num_rows:] = 0
        build_tile_table(
            qsl,
            seq_lens[:num_rows],
            self.tokens_per_tile(mixed),
            staging.host_view("prefill_tiles"),
        )
        staging.neutralise_tokens(num_tokens, mixed)
        return 0, mixed

    def _metadata(self, bs: int) -> AttentionMetadata:
        x = self.inputs
        return AttentionMetadata(
            num_decodes=bs,
            slot_mapping=x.slot_mapping[:bs],
            decode_seq_lens=x.seq_lens[:bs],
            decode_block_tables=x.block_tables[:bs],
            prefill_cu_seqlens_q=x.cu_seqlens[:1],  # never read: no prefill row
            prefill_seq_lens=x.seq_lens[bs:bs],
            prefill_block_tables=x.block_tables[bs:bs],
            max_prefill_query_len=0,
            decode_row_order=x.decode_order[:bs],
        )

    def _mixed_metadata(self, size: int | None = None) -> AttentionMetadata:
        x, rows = self.inputs, self.max_num_seqs
        size = self.mixed_tokens if size is None else size
        return AttentionMetadata(
            num_decodes=0,
            slot_mapping=x.slot_mapping[:size],
            decode_seq_lens=x.seq_lens[:0],
            decode_block_tables=x.block_tables[:0],
            prefill_cu_seqlens_q=x.cu_seqlens[: rows + 1],
            prefill_seq_lens=x.seq_lens[:rows],
            prefill_block_tables=x.block_tables[:rows],
            max_prefill_query_len=size,
            prefill_tiles=x.tiles[: self._num_tiles(size)],
        )

    def _capture_one(
        self, num_tokens: int, meta: AttentionMetadata
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        x = self.inputs
        # Warm-up outside the graph: Triton compiles / autotunes here, never during capture.
        self.forward(x.input_ids[:num_tokens], x.positions[:num_tokens], meta)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.forward(x.input_ids[:num_tokens], x.positions[:num_tokens], meta)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, out

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture the mixed graphs (the largest steps), then every decode bucket, largest first,
        into one shared memory pool. The inputs are set to harmless values (slot -1, seq_len 0, no
        tiles) so warm-up and capture touch no KV block."""
        x = self.inputs
        x.input_ids.zero_()
        x.positions.zero_()
        x.slot_mapping.fill_(-1)
        x.seq_lens.zero_()
        x.block_tables.zero_()
        x.cu_seqlens.zero_()
        x.tiles.fill_(-1)
        # The identity: a permutation of every prefix, as each bucket's view needs.
        torch.arange(x.decode_order.shape[0], out=x.decode_order)
        torch.cuda.synchronize()
        for size in reversed(self.mixed_sizes):
            self.mixed_graphs[size], self.mixed_outputs[size] = self._capture_one(
                size, self._mixed_metadata(size)
            )
        for bs in reversed(self.batch_sizes):
            self.graphs[bs], self.outputs[bs] = self._capture_one(bs, self._metadata(bs))
        torch.cuda.synchronize()
        logger.info(
            "captured CUDA graphs for decode batch sizes %s and steps with prefill of %s tokens",
            self.batch_sizes,
            self.mixed_sizes,
        )

    def replay(self, num_decodes: int) -> torch.Tensor:
        """Run the graph for num_decodes rows (already uploaded, padded rows neutralised);
        returns hidden states [num_decodes, hidden]."""
        bs = self.bucket(num_decodes)
        self.graphs[bs].replay()
        return self.outputs[bs][:num_decodes]

    def replay_mixed(self, num_tokens: int) -> torch.Tensor:
        """Run the mixed graph for a step of num_tokens tokens (uploaded with its tile table,
        padding tokens neutralised); returns hidden states [num_tokens, hidden]."""
        size = self.mixed_bucket(num_tokens)
        self.mixed_graphs[size].replay()
        return self.mixed_outputs[size][:num_tokens]
