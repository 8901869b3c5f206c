"""CUDA graphs for decode-only steps.

A decode step launches a few hundred small kernels; replaying one captured graph instead costs a
single launch, which is what keeps the GPU busy while the host prepares the next step. Graphs are
captured per batch-size bucket, largest first so that every smaller graph fits in the memory pool
the largest one made. A step of n decodes replays the smallest bucket >= n; the padded rows have
seq_len 0 and slot -1, so they read no KV and write nowhere.

The graphs read their inputs from the model runner's persistent device buffers (fixed addresses),
so a replay needs no copy beyond the one upload the runner does anyway.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minivllm.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Buckets 1, 2, 4, 8, then every 16 up to max_num_seqs (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    sizes.append(max_num_seqs)
    return sorted(set(sizes))


@dataclass(frozen=True)
class GraphInputs:
    """Fixed-address device views the captured graphs read. Rows [0, max_batch) of each."""

    input_ids: torch.Tensor  # [max_batch] int32
    positions: torch.Tensor  # [max_batch] int32
    slot_mapping: torch.Tensor  # [max_batch] int32
    seq_lens: torch.Tensor  # [max_batch] int32
    block_tables: torch.Tensor  # [max_batch, max_blocks] int32
    empty_cu_seqlens: torch.Tensor  # [1] int32, zero: "no prefill rows"


ForwardFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


class CudaGraphRunner:
    """Captures `forward(input_ids, positions, meta) -> hidden` for each decode batch bucket."""

    def __init__(self, forward: ForwardFn, inputs: GraphInputs, max_num_seqs: int):
        self.forward = forward
        self.inputs = inputs
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def bucket(self, num_decodes: int) -> int:
        """The captured batch size a step of num_decodes decodes replays."""
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, num_decodes)]

    def _metadata(self, bs: int) -> AttentionMetadata:
        x = self.inputs
        return AttentionMetadata(
            num_decodes=bs,
            slot_mapping=x.slot_mapping[:bs],
            decode_seq_lens=x.seq_lens[:bs],
            decode_block_tables=x.block_tables[:bs],
            prefill_cu_seqlens_q=x.empty_cu_seqlens,
            prefill_seq_lens=x.seq_lens[bs:bs],
            prefill_block_tables=x.block_tables[bs:bs],
            max_prefill_query_len=0,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, into one shared memory pool. The inputs are set
        to harmless values (slot -1, seq_len 0) so warm-up and capture touch no KV block."""
        x = self.inputs
        x.input_ids.zero_()
        x.positions.zero_()
        x.slot_mapping.fill_(-1)
        x.seq_lens.zero_()
        x.block_tables.zero_()
        torch.cuda.synchronize()
        for bs in reversed(self.batch_sizes):
            meta = self._metadata(bs)
            # Warm-up outside the graph: Triton compiles / autotunes here, never during capture.
            self.forward(x.input_ids[:bs], x.positions[:bs], meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.forward(x.input_ids[:bs], x.positions[:bs], meta)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
            self.outputs[bs] = out
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs for decode batch sizes %s..%s",
                    len(self.graphs), self.batch_sizes[0], self.batch_sizes[-1])

    def replay(self, num_decodes: int) -> torch.Tensor:
        """Run the graph for num_decodes rows (already uploaded, padded rows neutralised);
        returns hidden states [num_decodes, hidden]."""
        bs = self.bucket(num_decodes)
        self.graphs[bs].replay()
        return self.outputs[bs][:num_decodes]
