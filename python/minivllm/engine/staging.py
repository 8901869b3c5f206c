"""The step's staging buffers, and the step header that crosses to tensor-parallel workers.

The scheduler writes each step's arrays straight into one persistent int32 host buffer (pinned on
CUDA) at the offsets of a `StagingLayout`, which the C++ core defines and exports (field names,
dtypes, offsets; float fields are float32 bit patterns). The model runner adds the fields only it
writes (the prefill rows' cu_seqlens, a CUDA graph's tile table and decode row order), uploads
the buffer to its device twin with one copy, and the model reads fixed-address views of that
twin: what lets a CUDA graph replay a step without copies of its own.

With tensor parallelism, rank 0 sends the workers a `StepHeader` (the step's host ints) followed by
the used part of every field the forward reads; each worker unpacks it into its own buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch

from minivllm.layers.attention import AttentionMetadata
from minivllm.layers.sampler import SamplingTensors

from minivllm._core import StagingLayout

# Commands of the tensor-parallel wire format: the first int32 of every message to a worker.
CMD_STEP, CMD_SHUTDOWN = 1, 2

_TOKEN_FIELDS = ("input_ids", "positions")
_SAMPLED_FIELDS = ("logits_indices", "temperature", "top_k", "top_p", "min_p", "uniforms")


class BatchLike(Protocol):
    """What the runner reads of a scheduler Batch (the core's StagedBatch or the twin's Batch);
    its arrays are already in the staging buffer."""

    num_tokens: int
    num_decodes: int
    num_seqs: int
    num_samples: int
    max_blocks: int
    query_start_loc: np.ndarray  # [B + 1] int32
    all_greedy: bool
    any_top_k_or_p: bool
    any_min_p: bool


@dataclass
class StepInputs:
    """Device views for one step, handed to the model and the sampler."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn_metadata: AttentionMetadata | None  # None when a CUDA graph replays the step
    logits_indices: torch.Tensor  # [S]
    sampling: SamplingTensors
    graph_batch_size: int  # the captured bucket a decode-only step replays; 0: none
    mixed_graph: bool  # a step with prefill replaying the mixed CUDA graph
    samples_every_token: bool  # S == T, so logits_indices is arange(T)


class StagingBuffers:
    """One int32 staging buffer (host) and its device twin, with a view per field."""

    def __init__(
        self, max_tokens: int, max_seqs: int, max_blocks: int, max_tiles: int, device: torch.device
    ):
        self.layout = StagingLayout(max_tokens, max_seqs, max_blocks, max_tiles)
        on_cuda = device.type == "cuda"
        self.host_tensor = torch.zeros(self.layout.total, dtype=torch.int32, pin_memory=on_cuda)
        self.host = self.host_tensor.numpy()
        self.device_buf = (
            torch.zeros(self.layout.total, dtype=torch.int32, device=device)
            if on_cuda
            else self.host_tensor
        )
        self._copy_done: torch.cuda.Event | None = None
        # Whole-field views, made once: a step then costs one slice per field, not three ops.
        self._host_views: dict[str, np.ndarray] = {}
        self._dev_views: dict[str, torch.Tensor] = {}
        self._wire_views: dict[str, np.ndarray] = {}  # int32 whatever the field holds: `pack`
        for name in self.layout.fields:
            start, size = self.layout.offset(name), self.layout.size(name)
            host, dev = self.host[start : start + size], self.device_buf[start : start + size]
            self._wire_views[name] = host
            if self.layout.dtype(name) == "float32":
                host, dev = host.view(np.float32), dev.view(torch.float32)
            self._host_views[name], self._dev_views[name] = host, dev
        self.host_block_tables = self._host_views["block_tables"].reshape(max_seqs, max_blocks)
        self.dev_block_tables = self._dev_views["block_tables"].view(max_seqs, max_blocks)
        self._step_views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def host_view(self, name: str) -> np.ndarray:
        return self._host_views[name]

    def dev(self, name: str) -> torch.Tensor:
        return self._dev_views[name]

    def step_views(self, num_tokens: int, num_sampled: int) -> dict[str, torch.Tensor]:
        """The device views a step of this shape reads, made once per shape (slicing a tensor
        costs microseconds of host time; decode steps repeat a few hundred shapes)."""
        key = (num_tokens, num_sampled)
        views = self._step_views.get(key)
        if views is None:
            if len(self._step_views) >= 4096:
                self._step_views.clear()
            views = {name: self._dev_views[name][:num_tokens] for name in _TOKEN_FIELDS}
            views.update((name, self._dev_views[name][:num_sampled]) for name in _SAMPLED_FIELDS)
            self._step_views[key] = views
        return views

    def stage(self, batch: BatchLike) -> StepHeader:
        """The prefill rows' cu_seqlens (what only the runner writes for an eager step) and the
        step's header, without a CUDA graph."""
        nd, num_rows = batch.num_decodes, batch.num_seqs
        max_prefill_query_len = 0
        cu = self._host_views["prefill_cu_seqlens"]
        if num_rows > nd:
            qsl = batch.query_start_loc
            cu[: num_rows - nd + 1] = qsl[nd:] - qsl[nd]
            max_prefill_query_len = int(np.diff(cu[: num_rows - nd + 1]).max())
        else:
            cu[0] = 0
        return StepHeader(
            num_tokens=batch.num_tokens,
            num_decodes=nd,
            num_rows=num_rows,
            num_sampled=batch.num_samples,
            width=batch.max_blocks,
            max_prefill_query_len=max_prefill_query_len,
            graph_batch_size=0,
            mixed_graph_tokens=0,
            all_greedy=bool(batch.all_greedy),
            any_top_k_or_p=bool(batch.any_top_k_or_p),
            any_min_p=bool(batch.any_min_p),
        )

    def step_inputs(self, h: StepHeader) -> StepInputs:
        """Upload the host buffer once and build the step's device views (every rank)."""
        self.upload()
        nd, num_rows, width = h.num_decodes, h.num_rows, h.width
        meta = None
        if not h.graph_batch_size and not h.mixed_graph_tokens:  # a graph has its own views
            bt, seq_lens = self.dev_block_tables, self.dev("seq_lens")
            meta = AttentionMetadata(
                num_decodes=nd,
                slot_mapping=self.dev("slot_mapping")[: h.num_tokens],
                decode_seq_lens=seq_lens[:nd],
                decode_block_tables=bt[:nd, :width],
                prefill_cu_seqlens_q=self.dev("prefill_cu_seqlens")[: num_rows - nd + 1],
                prefill_seq_lens=seq_lens[nd:num_rows],
                prefill_block_tables=bt[nd:num_rows, :width],
                max_prefill_query_len=h.max_prefill_query_len,
            )
        views = self.step_views(h.num_tokens, h.num_sampled)
        sampling = SamplingTensors(
            temperature=views["temperature"],
            top_k=views["top_k"],
            top_p=views["top_p"],
            min_p=views["min_p"],
            uniforms=views["uniforms"],
            all_greedy=h.all_greedy,
            any_top_k_or_p=h.any_top_k_or_p,
            any_min_p=h.any_min_p,
        )
        return StepInputs(
            input_ids=views["input_ids"],
            positions=views["positions"],
            attn_metadata=meta,
            logits_indices=views["logits_indices"],
            sampling=sampling,
            graph_batch_size=h.graph_batch_size,
            mixed_graph=h.mixed_graph_tokens > 0,
            samples_every_token=h.num_sampled == h.num_tokens,
        )

    def neutralise_tokens(self, start: int, stop: int) -> None:
        """Padding tokens of a replayed graph: id 0, position 0, slot -1 (writes no KV)."""
        self._host_views["input_ids"][start:stop] = 0
        self._host_views["positions"][start:stop] = 0
        self._host_views["slot_mapping"][start:stop] = -1

    def wait_for_upload(self) -> None:
        """The host buffer may be rewritten only once the last upload has left it."""
        if self._copy_done is not None:
            self._copy_done.synchronize()
            self._copy_done = None

    def upload(self) -> None:
        if self.device_buf is not self.host_tensor:
            self.device_buf.copy_(self.host_tensor, non_blocking=True)
            self._copy_done = torch.cuda.Event()
            self._copy_done.record()

    def pack(self, header: StepHeader) -> np.ndarray:
        """The header and the used part of every field the forward and the sampler read, in one
        int32 array (what rank 0 sends its workers; with async scheduling they sample too)."""
        # Tensor parallelism runs every step eagerly: no graph padding or tile table to send.
        assert header.graph_batch_size == 0 and header.mixed_graph_tokens == 0, header
        parts = [header.to_array()]
        for name, length in header.payload_spans():
            parts.append(self._wire_views[name][:length])
        parts.append(self.host_block_tables[: header.num_rows, : header.width].ravel())
        return np.concatenate(parts)

    def unpack(self, message: np.ndarray) -> StepHeader:
        """A worker's side of `pack`: fill the host buffer, return the header."""
        self.wait_for_upload()
        header = StepHeader.from_array(message)
        pos = StepHeader.LENGTH
        for name, length in header.payload_spans():
            self._wire_views[name][:length] = message[pos : pos + length]
            pos += length
        rows, width = header.num_rows, header.width
        self.host_block_tables[:rows, :width] = message[pos : pos + rows * width].reshape(
            rows, width
        )
        return header


@dataclass(frozen=True)
class StepHeader:
    """The host ints of one step that are not in the staging buffer; every rank builds the same
    step inputs from these and its buffers."""

    num_tokens: int
    num_decodes: int
    num_rows: int
    num_sampled: int
    width: int  # block-table columns in use
    max_prefill_query_len: int
    graph_batch_size: int  # the captured bucket a decode-only step replays; 0: eager
    mixed_graph_tokens: int  # the captured token count a step with prefill replays; 0: none
    all_greedy: bool
    any_top_k_or_p: bool
    any_min_p: bool

    LENGTH = 12  # the command word, then the fields above

    def to_array(self) -> np.ndarray:
        return np.array(
            [CMD_STEP, *(int(getattr(self, f.name)) for f in fields(self))], dtype=np.int32
        )

    @classmethod
    def from_array(cls, a: np.ndarray) -> StepHeader:
        v = [int(x) for x in a[1 : cls.LENGTH]]
        return cls(*v[:8], bool(v[8]), bool(v[9]), bool(v[10]))

    def payload_spans(self) -> list[tuple[str, int]]:
        """(field, used length) of the fields the forward and the sampler read besides the block
        tables."""
        return [
            ("input_ids", self.num_tokens),
            ("positions", self.num_tokens),
            ("slot_mapping", self.num_tokens),
            ("seq_lens", self.num_rows),
            ("prefill_cu_seqlens", self.num_rows - self.num_decodes + 1),
            *((name, self.num_sampled) for name in _SAMPLED_FIELDS),
        ]


def schedule_into(scheduler: object, staging: StagingBuffers) -> object:
    """The scheduler's next Batch, written into the staging buffer once its last upload left."""
    staging.wait_for_upload()
    return scheduler.schedule_into(staging.host, staging.layout)
