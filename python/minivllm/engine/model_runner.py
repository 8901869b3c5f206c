"""ModelRunner: builds the model and its paged KV cache, and runs one scheduler Batch per call.

The scheduler writes each step's arrays straight into one persistent staging buffer (pinned on
CUDA; `schedule` -> `schedule_into`), which is uploaded to one persistent device buffer with a
single copy; the model and the sampler read fixed-address views of it, which is what lets a CUDA
graph replay a decode step. Logits are computed only at the sampled rows and sampled on the
device. `launch` issues a step without waiting: its sampled ids stay on the device (the next
step's placeholder inputs read them under async scheduling) and are copied back to one of two
pinned buffers; `StepResult.result()` is the step's only sync.

With tensor_parallel_size=N, rank 0's runner starts N-1 workers (engine/workers.py), each running
this same class on its own rank. A step is staged on rank 0 only (`_stage`: Batch -> staging
buffer + a small header); rank 0 sends the header and the used part of the buffer to the workers,
and every rank then runs `_step` on its own copy: same views, same forward (the layers' collectives
line up), same logits; only rank 0 samples.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch

from minivllm.config import EngineConfig
from minivllm.engine.cuda_graphs import CudaGraphRunner, GraphInputs
from minivllm.distributed import SINGLE_DEVICE, TPGroup, building_model
from minivllm.engine.reference import STAGING_LAYOUT, write_staging
from minivllm.engine.reference import Scheduler as TwinScheduler
from minivllm.engine.workers import CMD_STEP, SHUTDOWN_TIMEOUT_S, TPWorkers, WorkerError
from minivllm.layers import use_fused_kernels
from minivllm.layers.attention import AttentionMetadata, get_attention_backend
from minivllm.layers.sampler import Sampler, SamplingTensors
from minivllm.models.qwen3 import MODEL_REGISTRY
from minivllm.weights import init_dummy_weights, load_weights

logger = logging.getLogger(__name__)

# KV pool size on the CPU when num_kv_blocks is not given (there is no free-memory probe there).
CPU_KV_CACHE_BYTES = 256 << 20


class BatchLike(Protocol):
    """The scheduler's Batch (docs/interfaces.md); only these fields are read. A Batch from
    `schedule_into` (the core's StagedBatch) has only the first group: its arrays are already in
    the staging buffer."""

    num_decodes: int
    num_seqs: int
    num_tokens: int
    num_samples: int
    max_blocks: int
    query_start_loc: np.ndarray
    all_greedy: bool
    any_top_k_or_p: bool
    any_min_p: bool


class FullBatchLike(BatchLike, Protocol):
    """A Batch with its arrays, which `execute` copies into the staging buffer."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray
    logits_indices: np.ndarray
    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    min_p: np.ndarray
    uniforms: np.ndarray


@dataclass(frozen=True)
class KVCacheInfo:
    """What start-up measured: the pool's size (kept out of EngineConfig on purpose)."""

    num_blocks: int
    block_size: int
    bytes_per_block: int  # all layers, K and V, this rank's KV heads

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Only while the model's parameters are created; restored before anything else runs.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class _StepBuffers:
    """Persistent per-step inputs: one int32 staging buffer and its device twin, with fixed
    offsets per field (float fields are float32 views of the same bytes)."""

    def __init__(
        self,
        max_tokens: int,
        max_seqs: int,
        max_blocks: int,
        device: torch.device,
        max_tiles: int = 1,
    ):
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        sizes = {
            "input_ids": max_tokens,
            "positions": max_tokens,
            "slot_mapping": max_tokens,
            "logits_indices": max_seqs,
            "seq_lens": max_seqs,
            "prefill_cu_seqlens": max_seqs + 1,
            "block_tables": max_seqs * max_blocks,
            "top_k": max_seqs,
            "temperature": max_seqs,
            "top_p": max_seqs,
            "min_p": max_seqs,
            "uniforms": max_seqs,
            "prefill_tiles": max(max_tiles, 1),  # a mixed CUDA graph's tile table
            "decode_order": max_seqs,  # a decode graph step's rows, longest context first
        }
        self.offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for name, size in sizes.items():
            self.offsets[name] = (total, size)
            total += size
        on_cuda = device.type == "cuda"
        self.host = torch.zeros(total, dtype=torch.int32, pin_memory=on_cuda)
        self.device_buf = (
            torch.zeros(total, dtype=torch.int32, device=device) if on_cuda else self.host
        )
        self.host_np = self.host.numpy()
        self.copy_done: torch.cuda.Event | None = None
        # Whole-field views, made once: a step then costs one slice per field, not three ops.
        self._host_views: dict[str, np.ndarray] = {}
        self._dev_views: dict[str, torch.Tensor] = {}
        for name, (start, size) in self.offsets.items():
            host, dev = self.host_np[start : start + size], self.device_buf[start : start + size]
            if name in _FLOAT_FIELDS:
                host, dev = host.view(np.float32), dev.view(torch.float32)
            self._host_views[name], self._dev_views[name] = host, dev
        self._step_views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._host_block_tables = self._host_views["block_tables"].reshape(max_seqs, max_blocks)
        self._dev_block_tables = self._dev_views["block_tables"].view(max_seqs, max_blocks)
        # Where a scheduler's schedule_into writes (the order is reference.STAGING_LAYOUT).
        extra = {"block_tables_stride": max_blocks, "max_tokens": max_tokens, "max_seqs": max_seqs}
        self.layout = np.array(
            [extra[f] if f in extra else self.offsets[f][0] for f in STAGING_LAYOUT],
            dtype=np.int64,
        )

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

    def dev_block_tables(self) -> torch.Tensor:  # [max_seqs, max_blocks]
        return self._dev_block_tables

    def host_block_tables(self) -> np.ndarray:
        return self._host_block_tables

    def pack(self, header: _StepHeader) -> np.ndarray:
        """The header and the used part of every field the forward reads, in one int32 array
        (what rank 0 sends its workers; they do not sample, so sampling fields stay behind)."""
        # Tensor parallelism runs every step eagerly: a graph step's padding and tile table
        # are not part of the message.
        assert header.graph_batch_size == 0 and header.mixed_graph_tokens == 0, header
        parts = [header.to_array()]
        for name, length in _payload_spans(header):
            start = self.offsets[name][0]
            parts.append(self.host_np[start : start + length])
        parts.append(self._host_block_tables[: header.num_rows, : header.width].ravel())
        return np.concatenate(parts)

    def unpack(self, message: np.ndarray) -> _StepHeader:
        """A worker's side of `pack`: fill the staging buffer, return the header."""
        self.wait_for_upload()
        header = _StepHeader.from_array(message)
        pos = _StepHeader.LENGTH
        for name, length in _payload_spans(header):
            start = self.offsets[name][0]
            self.host_np[start : start + length] = message[pos : pos + length]
            pos += length
        rows, width = header.num_rows, header.width
        self._host_block_tables[:rows, :width] = message[pos : pos + rows * width].reshape(
            rows, width
        )
        return header

    def neutralise_tokens(self, start: int, stop: int) -> None:
        """Padding tokens of a replayed graph: id 0, position 0, slot -1 (writes no KV)."""
        self._host_views["input_ids"][start:stop] = 0
        self._host_views["positions"][start:stop] = 0
        self._host_views["slot_mapping"][start:stop] = -1

    def graph_inputs(self) -> GraphInputs:
        """The fixed-address device views CUDA graphs read: the whole of every field."""
        return GraphInputs(
            input_ids=self.dev("input_ids"),
            positions=self.dev("positions"),
            slot_mapping=self.dev("slot_mapping"),
            seq_lens=self.dev("seq_lens"),
            block_tables=self.dev_block_tables(),
            cu_seqlens=self.dev("prefill_cu_seqlens"),
            tiles=self.dev("prefill_tiles"),
            decode_order=self.dev("decode_order"),
        )

    def wait_for_upload(self) -> None:
        """The staging buffer may be rewritten only once the last upload has left it."""
        if self.copy_done is not None:
            self.copy_done.synchronize()
            self.copy_done = None

    def upload(self) -> None:
        if self.device_buf is not self.host:
            self.device_buf.copy_(self.host, non_blocking=True)
            self.copy_done = torch.cuda.Event()
            self.copy_done.record()


_FLOAT_FIELDS = frozenset({"temperature", "top_p", "min_p", "uniforms"})
_TOKEN_FIELDS = ("input_ids", "positions")
_SAMPLED_FIELDS = ("logits_indices", "temperature", "top_k", "top_p", "min_p", "uniforms")


@dataclass(frozen=True)
class _StepHeader:
    """The host ints of one step that are not in the staging buffer; every rank builds the
    same StepInputs from these and its buffer."""

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
    def from_array(cls, a: np.ndarray) -> _StepHeader:
        v = [int(x) for x in a[1 : cls.LENGTH]]
        return cls(*v[:8], bool(v[8]), bool(v[9]), bool(v[10]))


def _payload_spans(h: _StepHeader) -> list[tuple[str, int]]:
    """(field, used length) of the fields the forward reads; a replayed graph also reads its
    padding rows, which `_stage` neutralised."""
    tokens = max(h.num_tokens, h.graph_batch_size)
    rows = max(h.num_rows, h.graph_batch_size)
    return [
        ("input_ids", tokens),
        ("positions", tokens),
        ("slot_mapping", tokens),
        ("seq_lens", rows),
        ("prefill_cu_seqlens", h.num_rows - h.num_decodes + 1),
        ("logits_indices", h.num_sampled),
    ]


@dataclass
class StepInputs:
    """Device views for one step, handed to the model and the sampler."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn_metadata: AttentionMetadata | None  # None when a CUDA graph replays the step
    logits_indices: torch.Tensor  # [S]
    sampling: SamplingTensors
    graph_batch_size: int | None = None  # the captured bucket this decode-only step replays
    samples_every_token: bool = False  # S == T, so logits_indices is arange(T)
    mixed_graph: bool = False  # a step with prefill replaying the mixed CUDA graph


class ModelRunner:
    """Rank 0's runner (`tp_group` None) starts the tensor-parallel workers when
    tensor_parallel_size > 1; a worker builds its own with the group it joined."""

    def __init__(self, config: EngineConfig, tp_group: TPGroup | None = None):
        self.config = config
        self.workers: TPWorkers | None = None
        self.is_closed = False
        self.tp = tp_group if tp_group is not None else SINGLE_DEVICE
        self.device = config.rank_device(self.tp.rank)
        self.dtype = config.torch_dtype
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if tp_group is None and config.tensor_parallel_size > 1:
            self.workers = TPWorkers(config)
            self.tp = self.workers.group
        try:
            self._build()
        except BaseException as e:
            try:
                if self.workers is not None and isinstance(e, RuntimeError):
                    # A collective failed: if a worker died first, raise its traceback.
                    self.workers.check_alive(wait_s=2.0)
            finally:
                self.close(timeout_s=0.0)
            raise

    def _build(self) -> None:
        config, mc = self.config, self.config.model_config
        self.backend = get_attention_backend(config.attention_backend_name)
        model_cls = MODEL_REGISTRY[mc.architecture]
        with _default_dtype(self.dtype), torch.device(self.device), building_model(self.tp):
            self.model = model_cls(mc, self.backend)
        self.model.eval()
        if self.tp.size > 1:
            # Set the communicator up now, so the memory profile below sees it in use.
            self.tp.all_reduce(torch.zeros(1, device=self.device))
        if config.load_format == "dummy":
            init_dummy_weights(self.model, seed=config.seed)
        else:
            load_weights(self.model, config.model, allow_unused=config.allow_unused_weights)
        self.sampler = Sampler()
        self.vocab_size = mc.vocab_size
        max_tokens = max(config.max_num_batched_tokens, config.max_num_seqs)
        # CUDA graphs (Triton backend, one GPU): decode-only steps per batch bucket, and steps
        # with prefill of max_num_batched_tokens tokens (fewer, padded up) with a tile table.
        self._graphs_planned = (
            self.device.type == "cuda"
            and not config.enforce_eager
            and self.backend.name == "triton"
            and self.tp.size == 1
        )
        from minivllm.kernels.flash_prefill import max_tiles, tile_config

        group = mc.num_attention_heads // mc.num_key_value_heads
        block_m = tile_config(
            config.block_size, group, self._num_kv_heads, config.max_num_batched_tokens,
            self.device,
        )[0]
        self._mixed_tokens_per_tile = block_m // group
        num_tiles = max_tiles(
            config.max_num_batched_tokens, config.max_num_seqs, self._mixed_tokens_per_tile
        )
        self.buffers = _StepBuffers(
            max_tokens, config.max_num_seqs, config.max_blocks_per_seq, self.device, num_tiles
        )
        # The last step's sampled ids on the device (placeholders of the next step read them),
        # and two pinned host buffers they are copied back into, alternately.
        self.last_sampled = torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device)
        on_cuda = self.device.type == "cuda"
        self._read_back_host = [
            torch.zeros(config.max_num_seqs, dtype=torch.int64, pin_memory=on_cuda)
            for _ in range(2)
        ]
        self._read_back_slot = 0
        self.graph_runner: CudaGraphRunner | None = None  # captured after the pool is sized
        self.kv_cache_info = self._allocate_kv_cache()
        if self.tp.rank == 0:
            logger.info(
                "KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB per rank) on %s, "
                "attention backend %s, tensor_parallel_size %d",
                self.kv_cache_info.num_blocks,
                config.block_size,
                self.kv_cache_info.num_tokens,
                self.kv_cache_info.num_blocks * self.kv_cache_info.bytes_per_block / 2**20,
                self.device,
                self.backend.name,
                self.tp.size,
            )
        # The torch reference backend syncs on sequence lengths, so only Triton is captured.
        if self._graphs_planned:
            self.graph_runner = self._capture_cuda_graphs()
        elif (
            self.device.type == "cuda"
            and not config.enforce_eager
            and self.backend.name == "triton"
            and self.tp.rank == 0
        ):
            logger.info(
                "CUDA graphs off: tensor_parallel_size=%d runs every step eagerly "
                "(graph capture with NCCL collectives is not implemented)",
                self.tp.size,
            )
        if self.device.type == "cuda":
            self._warm_up_step_kinds()

    def close(self, timeout_s: float | None = None) -> None:
        """End the tensor-parallel workers (rank 0) and give back the KV pool and the CUDA
        graphs' memory now, not whenever the engine is garbage-collected (so a closed engine
        does not shrink the pool of the next one in the process). Idempotent."""
        self.is_closed = True
        if self.workers is not None:
            workers, self.workers = self.workers, None
            workers.close(SHUTDOWN_TIMEOUT_S if timeout_s is None else timeout_s)
        model = self.__dict__.get("model")
        if model is not None:
            for attn in model.attention_layers():
                attn.k_cache = attn.v_cache = torch.empty(0)
        self.graph_runner = None
        self.kv_cache = None
        if self.device.type == "cuda":
            try:
                torch.cuda.empty_cache()
            except RuntimeError:  # a sticky CUDA error: keep the one being raised, if any
                pass

    # ---- KV cache --------------------------------------------------------------------------

    @property
    def _num_kv_heads(self) -> int:
        """KV heads on this rank (EngineConfig checked that tensor_parallel_size divides them)."""
        return self.config.model_config.num_key_value_heads // self.tp.size

    def _bytes_per_block(self) -> int:
        mc = self.config.model_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        per_token = 2 * mc.num_hidden_layers * self._num_kv_heads * mc.head_dim * elem
        return per_token * self.config.block_size

    def _allocate_kv_cache(self) -> KVCacheInfo:
        config, mc = self.config, self.config.model_config
        bytes_per_block = self._bytes_per_block()
        needed = config.max_blocks_per_seq  # one max_model_len sequence
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        elif self.device.type == "cuda":
            num_blocks = self._profile_num_blocks(bytes_per_block)
        else:
            wanted = config.max_num_seqs * needed
            num_blocks = max(needed, min(wanted, CPU_KV_CACHE_BYTES // bytes_per_block))
        # Every rank holds the same block ids: the pool is what the tightest rank affords.
        num_blocks = self.tp.min_int(num_blocks, self.device)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {config.block_size} tokens "
                f"({num_blocks * config.block_size} tokens), less than one max_model_len="
                f"{config.max_model_len} sequence needs ({needed} blocks); raise num_kv_blocks or "
                "gpu_memory_utilization, or lower max_model_len"
            )
        shape = (
            2,
            mc.num_hidden_layers,
            num_blocks,
            config.block_size,
            self._num_kv_heads,
            mc.head_dim,
        )
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache = self.kv_cache[0, i]
            attn.v_cache = self.kv_cache[1, i]
        return KVCacheInfo(num_blocks, config.block_size, bytes_per_block)

    def _profile_num_blocks(self, bytes_per_block: int) -> int:
        """Run a warm-up forward at max_num_batched_tokens (plus sampling of max_num_seqs rows)
        with a throwaway cache, then give the KV pool what gpu_memory_utilization leaves."""
        config = self.config
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_before = total - free
        allocated_before = torch.cuda.memory_allocated(self.device)
        batch = _warmup_batch(config)
        num_tmp_blocks = int(batch.block_tables.max()) + 1
        mc = config.model_config
        tmp = torch.zeros(
            (
                2,
                mc.num_hidden_layers,
                num_tmp_blocks,
                config.block_size,
                self._num_kv_heads,
                mc.head_dim,
            ),
            dtype=self.dtype,
            device=self.device,
        )
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = tmp[0, i], tmp[1, i]
        # Every rank runs the same warm-up step itself, so the collectives line up.
        self._run_step(self._stage(batch))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - allocated_before
        activations = max(0, peak - tmp.numel() * tmp.element_size())  # the throwaway cache aside
        del tmp
        for attn in self.model.attention_layers():
            attn.k_cache = attn.v_cache = torch.empty(0, device=self.device)
        torch.cuda.empty_cache()
        budget = total * config.gpu_memory_utilization - used_before - peak
        if self._graphs_planned:
            # The mixed-step CUDA graph's pool keeps a full step's activations for good, beside
            # what an eager step allocates.
            budget -= activations
        num_blocks = int(budget // bytes_per_block)
        logger.info(
            "memory: %.2f GiB in use before the pool (weights and others), warm-up peak "
            "%.2f GiB, pool budget %.2f GiB",
            used_before / 2**30,
            peak / 2**30,
            max(budget, 0) / 2**30,
        )
        return max(num_blocks, 0)

    @torch.inference_mode()
    def _warm_up_step_kinds(self) -> None:
        """Run a short prefill step and a full mixed step (decodes beside long prefill chunks
        filling max_num_batched_tokens, sampling and greedy rows) once at start-up, so the kernel
        variants they need (both prefill tile configurations, eager decode) compile now, and the
        allocator already holds a full step's activations, instead of inside the first requests.
        Every rank plans the same steps with a throwaway twin scheduler; they write K/V only into
        blocks the real scheduler has not handed out yet."""
        config = self.config
        bs = config.block_size
        budget, max_len = config.max_num_batched_tokens, config.max_model_len - 2
        num_short = min(config.max_num_seqs, 5)  # decodes in the mixed step (odd: unaligned)
        short = [1 + (7 * i + 5) % max(1, min(60, max_len)) for i in range(num_short)]
        # Long rows fit the pool beside the short ones (a pool may hold one sequence only).
        room = (self.kv_cache_info.num_blocks - sum(-(-(n + 2) // bs) for n in short)) * bs - 2
        long_len = max(1, min(1024, max_len, room))
        num_long = min(config.max_num_seqs - num_short, -(-(budget - num_short) // long_len))
        lens = short + [long_len] * max(0, num_long)
        sched = TwinScheduler(
            num_blocks=min(sum(-(-(n + 2) // bs) for n in lens), self.kv_cache_info.num_blocks),
            block_size=bs,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=config.max_model_len,
            enable_prefix_caching=False,
        )
        for i, n in enumerate(lens):
            if i == num_short:  # the short ones prefill, then decode beside the long ones
                batch = sched.schedule()
                tokens = self._run_step(self._stage(batch, eager=True))
                if self.tp.rank != 0:  # only rank 0 samples
                    tokens = np.zeros(batch.num_samples, dtype=np.int64)
                sched.update(tokens)
            sched.add_request(i, [0] * n, 2, temperature=0.7 if i % 2 else 0.0, seed=i)
        batch = sched.schedule()
        if batch is not None:
            # Eager even where the mixed CUDA graph would run it: smaller steps with prefill
            # run eagerly, and their kernel variants compile here.
            self._run_step(self._stage(batch, eager=True))
        torch.cuda.synchronize(self.device)

    # ---- one step --------------------------------------------------------------------------

    def prepare(self, batch: BatchLike, staged: bool = False) -> StepInputs:
        """Stage the Batch and build its device views (one device; benchmarks use it)."""
        return self._build_inputs(self._stage(batch, staged))

    def schedule(self, scheduler: Any) -> BatchLike | None:
        """The scheduler's next Batch, written straight into the staging buffer (once the last
        upload has left it); run it with `execute(batch, staged=True)`."""
        buf = self.buffers
        buf.wait_for_upload()
        return scheduler.schedule_into(buf.host_np, buf.layout)

    def _copy_batch(self, batch: FullBatchLike) -> None:
        """A Batch's arrays into the staging buffer, where schedule_into would have put them."""
        buf = self.buffers
        buf.wait_for_upload()
        num_tokens, num_rows, width = batch.num_tokens, batch.num_seqs, batch.max_blocks
        if num_tokens > buf.max_tokens or num_rows > buf.max_seqs or width > buf.max_blocks:
            raise RuntimeError(
                f"batch of {num_tokens} tokens / {num_rows} rows / {width} blocks exceeds the "
                f"step buffers ({buf.max_tokens} / {buf.max_seqs} / {buf.max_blocks})"
            )
        write_staging(batch, buf.host_np, buf.layout)

    def _stage(self, batch: BatchLike, staged: bool = False, eager: bool = False) -> _StepHeader:
        """Put the Batch in the staging buffer (copied unless `staged`: schedule_into wrote it)
        and sum up the step in a header (rank 0). A step that replays a CUDA graph also gets its
        padding rows neutralised (a mixed step: its tile table); `eager` keeps a step with
        prefill off the mixed graph."""
        if not staged:
            self._copy_batch(batch)
        buf = self.buffers
        num_tokens, num_rows, nd = batch.num_tokens, batch.num_seqs, batch.num_decodes
        max_prefill_query_len = 0
        if num_rows > nd:
            qsl = batch.query_start_loc
            prefill_qsl = qsl[nd:] - qsl[nd]
            buf.host_view("prefill_cu_seqlens")[: num_rows - nd + 1] = prefill_qsl
            max_prefill_query_len = int(np.diff(prefill_qsl).max())
        else:
            buf.host_view("prefill_cu_seqlens")[0] = 0
        graph_bs = self._graph_bucket(num_tokens, nd, num_rows)
        if graph_bs is not None:
            seq_lens = buf.host_view("seq_lens")
            if graph_bs > nd:
                # Padded graph rows: seq_len 0 and slot -1 read no KV and write nowhere.
                buf.neutralise_tokens(nd, graph_bs)
                seq_lens[nd:graph_bs] = 0
            # Longest context first (padding last): the decode kernel's programs take the rows
            # in this order, so the longest rows do not form the grid's tail.
            order = np.argsort(-seq_lens[:graph_bs], kind="stable")
            buf.host_view("decode_order")[:graph_bs] = order
        mixed_tokens = 0 if eager else self._mixed_graph_tokens(num_tokens, nd)
        if mixed_tokens:
            # Every row is a "prefill" row (a decode is a one-token query) named by the tile
            # table; padding tokens past the step have no row and write no KV.
            from minivllm.kernels.flash_prefill import build_tile_table

            qsl = batch.query_start_loc
            buf.host_view("prefill_cu_seqlens")[: num_rows + 1] = qsl
            buf.host_view("prefill_cu_seqlens")[num_rows + 1 :] = num_tokens  # empty rows
            buf.host_view("seq_lens")[num_rows:] = 0
            build_tile_table(
                qsl,
                buf.host_view("seq_lens")[:num_rows],
                self._mixed_tokens_per_tile,
                buf.host_view("prefill_tiles"),
            )
            buf.neutralise_tokens(num_tokens, mixed_tokens)
        return _StepHeader(
            num_tokens=num_tokens,
            num_decodes=nd,
            num_rows=num_rows,
            num_sampled=batch.num_samples,
            width=batch.max_blocks,
            max_prefill_query_len=max_prefill_query_len,
            graph_batch_size=graph_bs or 0,
            mixed_graph_tokens=mixed_tokens,
            all_greedy=bool(batch.all_greedy),
            any_top_k_or_p=bool(batch.any_top_k_or_p),
            any_min_p=bool(batch.any_min_p),
        )

    def _build_inputs(self, h: _StepHeader) -> StepInputs:
        """Upload the staging buffer once and build the step's device views (every rank)."""
        buf = self.buffers
        buf.upload()
        nd, num_rows = h.num_decodes, h.num_rows
        num_tokens, num_sampled = h.num_tokens, h.num_sampled
        meta = None
        if not h.graph_batch_size and not h.mixed_graph_tokens:  # a graph has its own views
            bt = buf.dev_block_tables()
            seq_lens = buf.dev("seq_lens")
            meta = AttentionMetadata(
                num_decodes=nd,
                slot_mapping=buf.dev("slot_mapping")[:num_tokens],
                decode_seq_lens=seq_lens[:nd],
                decode_block_tables=bt[:nd, : h.width],
                prefill_cu_seqlens_q=buf.dev("prefill_cu_seqlens")[: num_rows - nd + 1],
                prefill_seq_lens=seq_lens[nd:num_rows],
                prefill_block_tables=bt[nd:num_rows, : h.width],
                max_prefill_query_len=h.max_prefill_query_len,
            )
        views = buf.step_views(num_tokens, num_sampled)
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
            graph_batch_size=h.graph_batch_size or None,
            samples_every_token=num_sampled == num_tokens,
            mixed_graph=h.mixed_graph_tokens > 0,
        )

    def run_model(self, inputs: StepInputs) -> torch.Tensor:
        """The forward pass: [T] tokens -> [T, hidden]; decode-only steps replay a CUDA graph."""
        if inputs.graph_batch_size is not None:
            return self.graph_runner.replay(inputs.input_ids.shape[0])
        if inputs.mixed_graph:
            return self.graph_runner.replay_mixed(inputs.input_ids.shape[0])
        return self._forward(inputs.input_ids, inputs.positions, inputs.attn_metadata)

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata | None
    ) -> torch.Tensor:
        """The model, after resolving async scheduling's placeholder input ids (-(j + 1): row j
        of the last step's samples) from the device copy of those samples; captured as is."""
        if self.config.async_scheduling:
            if use_fused_kernels(input_ids):
                from minivllm.kernels.input_ids import resolve_placeholders

                resolve_placeholders(input_ids, self.last_sampled)
            else:
                from minivllm.kernels.reference import resolve_placeholders

                resolve_placeholders(input_ids, self.last_sampled)
        return self.model(input_ids, positions, meta)

    def _graph_bucket(self, num_tokens: int, num_decodes: int, num_rows: int) -> int | None:
        """The captured batch size for a decode-only step, or None when it runs eagerly."""
        runner = self.graph_runner
        if runner is None or num_decodes != num_rows or num_tokens != num_decodes:
            return None
        if num_decodes == 0 or num_decodes > runner.max_batch_size:
            return None
        return runner.bucket(num_decodes)

    def _mixed_graph_tokens(self, num_tokens: int, num_decodes: int) -> int:
        """The token count of the mixed CUDA graph a step with prefill replays (its tokens
        padded up to it), or 0 when it runs eagerly: too few tokens to be worth the padding."""
        runner = self.graph_runner
        if runner is None or not runner.mixed_tokens or num_tokens == num_decodes:
            return 0
        if 2 * num_tokens < runner.mixed_tokens or num_tokens > runner.mixed_tokens:
            return 0
        return runner.mixed_tokens

    def _capture_cuda_graphs(self) -> CudaGraphRunner:
        max_bs = self.config.max_num_seqs
        inputs = self.buffers.graph_inputs()
        # The tile table packs rows into 15 bits, and its length is a grid dimension (< 2^16).
        fits = max_bs < 1 << 15 and inputs.tiles.shape[0] < 1 << 16
        runner = CudaGraphRunner(
            self._forward,
            inputs,
            max_bs,
            mixed_tokens=self.config.max_num_batched_tokens if fits else 0,
        )
        runner.capture()
        # Capture wrote harmless values into the device buffers; the staging buffer is the
        # source of truth for the next upload.
        return runner

    @torch.inference_mode()
    def launch(self, batch: BatchLike, staged: bool = False) -> StepResult:
        """Issue one step (a Batch from `schedule` with staged=True, or any full Batch, copied
        in) without waiting for it; its sampled ids come back through the result. With tensor
        parallelism this is rank 0's call: it also drives the workers."""
        if self.is_closed:
            raise RuntimeError("this engine was closed")
        header = self._stage(batch, staged)
        if self.workers is None:
            return self._read_back(self._step(header), header.num_sampled)
        self.workers.send(self.buffers.pack(header))
        try:
            return self._read_back(self._step(header), header.num_sampled)
        except RuntimeError as e:  # a collective failed: name the worker behind it
            self.workers.check_alive(wait_s=2.0)
            raise WorkerError(f"tensor-parallel step failed: {e}") from e

    def execute(self, batch: BatchLike, staged: bool = False) -> np.ndarray:
        """`launch`, then wait: the sampled ids, int64 [S]."""
        return self.launch(batch, staged).result()

    @torch.inference_mode()
    def execute_worker_step(self, message: np.ndarray) -> None:
        """A worker's side of `execute`: the step rank 0 packed, run on this rank's shards."""
        self._step(self.buffers.unpack(message))

    def _step(self, header: _StepHeader) -> torch.Tensor | None:
        """Forward, logits, sampling: the sampled ids on the device (rank 0), else None."""
        inputs = self._build_inputs(header)
        hidden = self.run_model(inputs)
        if header.num_sampled == 0:
            return None
        # logits_indices is strictly increasing, so S == T means every row: skip the gather.
        sampled_hidden = hidden if inputs.samples_every_token else hidden[inputs.logits_indices]
        logits = self.model.compute_logits(sampled_hidden)  # every rank: the LM head gathers
        if self.tp.rank != 0:
            return None  # only rank 0 samples
        return self.sampler(logits, inputs.sampling)

    def _read_back(self, token_ids: torch.Tensor | None, num_sampled: int) -> StepResult:
        """Keep the step's samples on the device for the next step's placeholders, and start
        copying them to the host (one of two pinned buffers, so a step's copy never lands on
        the previous step's ids before they are read)."""
        if token_ids is None:
            return StepResult(np.zeros(num_sampled if self.tp.rank == 0 else 0, dtype=np.int64))
        self.last_sampled[:num_sampled].copy_(token_ids)
        if self.device.type != "cuda":
            return StepResult(token_ids.numpy().astype(np.int64))
        self._read_back_slot ^= 1
        host = self._read_back_host[self._read_back_slot][:num_sampled]
        host.copy_(self.last_sampled[:num_sampled], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return StepResult(host.numpy(), done)

    def _run_step(self, header: _StepHeader) -> np.ndarray:
        """A warm-up step, run to its sampled ids (placeholders only for ranks > 0)."""
        return self._read_back(self._step(header), header.num_sampled).result()


class StepResult:
    """A launched step's sampled ids: `result()` waits for the copy to the host (if any)."""

    __slots__ = ("_done", "_ids")

    def __init__(self, ids: np.ndarray, done: torch.cuda.Event | None = None):
        self._ids, self._done = ids, done

    def result(self) -> np.ndarray:
        if self._done is not None:
            self._done.synchronize()
            self._ids, self._done = self._ids.copy(), None  # the pinned buffer is reused
        return self._ids


def _warmup_batch(config: EngineConfig) -> FullBatchLike:
    """A prefill-only Batch of max_num_batched_tokens tokens in up to max_num_seqs sequences,
    each sampling with top-k, top-p and min-p so the sampler's largest path is measured too;
    planned by a throwaway twin scheduler on a pool of its own."""
    wanted = config.max_num_batched_tokens
    seq_len = min(-(-wanted // config.max_num_seqs), config.max_model_len - 1)
    num_seqs = min(config.max_num_seqs, -(-wanted // seq_len))
    num_tokens = min(wanted, num_seqs * seq_len)
    lens = [seq_len] * (num_seqs - 1) + [num_tokens - seq_len * (num_seqs - 1)]
    bs = config.block_size
    sched = TwinScheduler(
        num_blocks=num_seqs * -(-seq_len // bs),
        block_size=bs,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len,
        enable_prefix_caching=False,
    )
    for i, n in enumerate(lens):
        sched.add_request(i, [0] * n, 1, temperature=1.0, top_p=0.9, top_k=50, min_p=0.05)
    batch = sched.schedule()
    assert batch is not None and batch.num_tokens == num_tokens, (batch, num_tokens)
    return batch
