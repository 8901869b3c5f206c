"""ModelRunner: builds the model and its paged KV cache, and runs one scheduler Batch per launch.

A step: the scheduler has written the Batch into the staging buffer (engine/staging.py); `launch`
adds what only the runner writes (the CUDA-graph plan, the prefill rows' offsets), uploads the
buffer with one copy, runs the model (replaying a captured graph where one fits), computes logits
only at the sampled rows, samples on the device and starts copying the ids back into one of two
pinned buffers. It never waits: `StepResult.result()` is the step's only sync, and the ids also
stay on the device, where the next step's placeholder inputs (async scheduling) read them.

With tensor_parallel_size=N, rank 0's runner sends each step (a header and the used part of the
staging buffer) to the N-1 workers (engine/workers.py), which run this same class on their own
ranks: same views, same forward (the layers' collectives line up), same logits; only rank 0
samples.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from minivllm.config import EngineConfig
from minivllm.distributed import SINGLE_DEVICE, TPGroup, WorkerError, building_model
from minivllm.engine import kv_cache, warmup
from minivllm.engine.cuda_graphs import CudaGraphRunner, GraphInputs, StepShape
from minivllm.engine.logprobs import LogprobsPlan, StepLogprobs, as_numpy, start_copy
from minivllm.engine.logprobs import compute as compute_logprobs
from minivllm.engine.staging import StagingBuffers, StepHeader
from minivllm.layers import fused_kernels_on
from minivllm.layers.attention import AttentionMetadata, get_attention_backend
from minivllm.layers.sampler import Sampler, SamplingTensors
from minivllm.models.qwen3 import MODEL_REGISTRY
from minivllm.weights import init_dummy_weights, load_weights

logger = logging.getLogger(__name__)


class BatchLike(StepShape, Protocol):
    """What the runner reads of a scheduler Batch (the core's StagedBatch or the twin's Batch);
    its arrays are already in the staging buffer."""

    num_samples: int
    max_blocks: int
    all_greedy: bool
    any_top_k_or_p: bool
    any_min_p: bool


class StepSender(Protocol):
    """Rank 0's handle on the tensor-parallel workers (engine/workers.py: TPWorkers)."""

    def send(self, message: np.ndarray) -> None: ...
    def check_alive(self, wait_s: float = 0.0) -> None: ...
    def close(self, timeout_s: float | None = None) -> None: ...


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


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Only while the model's parameters are created; restored before anything else runs.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    """One rank's model, KV cache, staging buffers and CUDA graphs. Rank 0 gets the workers'
    handle (`workers`) when tensor_parallel_size > 1 and drives them from `launch`."""

    def __init__(
        self,
        config: EngineConfig,
        tp_group: TPGroup = SINGLE_DEVICE,
        workers: StepSender | None = None,
    ):
        self.config = config
        self.tp = tp_group
        self.workers = workers
        self.is_closed = False
        self.device = config.rank_device(self.tp.rank)
        self.dtype = config.torch_dtype
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.graph_runner: CudaGraphRunner | None = None
        self.kv_cache: torch.Tensor | None = None
        self._build()

    @property
    def num_kv_heads(self) -> int:
        """KV heads on this rank (EngineConfig checked that tensor_parallel_size divides them)."""
        return self.config.model_config.num_key_value_heads // self.tp.size

    def _build(self) -> None:
        config, mc = self.config, self.config.model_config
        self.backend = get_attention_backend(config.attention_backend_name)
        with _default_dtype(self.dtype), torch.device(self.device), building_model(self.tp):
            self.model = MODEL_REGISTRY[mc.architecture](mc, self.backend)
        self.model.eval()
        if self.tp.size > 1:
            # Set the communicator up now, so the memory profile below sees it in use.
            self.tp.all_reduce(torch.zeros(1, device=self.device))
        if config.load_format == "dummy":
            init_dummy_weights(self.model, seed=config.seed)
        else:
            load_weights(self.model, config.model, allow_unused=config.allow_unused_weights)
        fused = fused_kernels_on(self.device)
        self.sampler = Sampler(fused=fused)
        placeholders = "minivllm.kernels.input_ids" if fused else "minivllm.kernels.reference"
        self._resolve_placeholders = importlib.import_module(placeholders).resolve_placeholders
        # CUDA graphs need the Triton backend (the torch reference syncs) on one GPU.
        self.graphs_planned = (
            self.device.type == "cuda"
            and not config.enforce_eager
            and self.backend.name == "triton"
            and self.tp.size == 1
        )
        max_tokens = max(config.max_num_batched_tokens, config.max_num_seqs)
        # A mixed graph's tile table has at most one entry per query token plus one per row.
        max_tiles = max_tokens + config.max_num_seqs
        self.staging = StagingBuffers(
            max_tokens, config.max_num_seqs, config.max_blocks_per_seq, max_tiles, self.device
        )
        # The last step's sampled ids on the device (placeholders of the next step read them),
        # and two pinned host buffers they are copied back into, alternately.
        self.last_sampled = torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device)
        pinned = self.device.type == "cuda"
        self._read_back_host = [
            torch.zeros(config.max_num_seqs, dtype=torch.int64, pin_memory=pinned) for _ in range(2)
        ]
        self._read_back_slot = 0
        self.kv_cache, self.kv_cache_info = kv_cache.allocate(self)
        if self.tp.rank == 0:
            info = self.kv_cache_info
            logger.info(
                "KV cache: %d blocks of %d tokens (%.1f MiB per rank) on %s, attention backend "
                "%s, tensor_parallel_size %d",
                info.num_blocks, info.block_size, info.num_blocks * info.bytes_per_block / 2**20,
                self.device, self.backend.name, self.tp.size,
            )  # fmt: skip
        if self.graphs_planned:
            self.graph_runner = self._capture_cuda_graphs()
        if self.device.type == "cuda":
            warmup.warm_up_step_kinds(self)
            torch.cuda.synchronize(self.device)
        # Start-up is over: from here a collective waiting on a peer means a step is stuck.
        self.tp.timeout = datetime.timedelta(seconds=config.tp_step_timeout_s)

    def _capture_cuda_graphs(self) -> CudaGraphRunner:
        from minivllm.kernels.flash_prefill import tile_config

        config, mc = self.config, self.config.model_config
        inputs = GraphInputs.from_staging(self.staging)
        group = mc.num_attention_heads // mc.num_key_value_heads
        block_m = tile_config(
            config.block_size, group, self.num_kv_heads, config.max_num_batched_tokens, self.device
        )[0]
        # The tile table packs rows into 15 bits, and its length is a grid dimension (< 2^16).
        fits = config.max_num_seqs < 1 << 15 and inputs.tiles.shape[0] < 1 << 16
        runner = CudaGraphRunner(
            self._forward,
            inputs,
            config.max_num_seqs,
            mixed_tokens=config.max_num_batched_tokens if fits else 0,
            tokens_per_tile=block_m // group,
        )
        runner.capture()
        return runner

    def close(self, timeout_s: float | None = None) -> None:
        """End the tensor-parallel workers (rank 0) and give back the KV pool and the CUDA
        graphs' memory now, not at garbage collection (so a closed engine does not shrink the
        pool of the next one in the process). Idempotent."""
        self.is_closed = True
        if self.workers is not None:
            workers, self.workers = self.workers, None
            workers.close(timeout_s)
        if self.__dict__.get("model") is not None:
            kv_cache.detach(self)
        self.graph_runner = None
        self.kv_cache = None
        if self.device.type == "cuda":
            try:
                torch.cuda.empty_cache()
            except RuntimeError:  # a sticky CUDA error: keep the one being raised, if any
                pass

    # ---- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def launch(self, batch: BatchLike, logprobs: LogprobsPlan | None = None) -> StepResult:
        """Issue one step whose arrays the scheduler wrote into the staging buffer, without
        waiting for it (with the logprobs of the rows `logprobs` names). With tensor parallelism
        this is rank 0's call: it drives the workers."""
        if self.is_closed:
            raise RuntimeError("this engine was closed")
        header = self._stage(batch)
        if self.workers is None:
            return self._read_back(*self._step(header, logprobs), header.num_sampled, logprobs)
        self.workers.send(self.staging.pack(header))
        try:
            result = self._read_back(*self._step(header, logprobs), header.num_sampled, logprobs)
        except RuntimeError as e:  # a collective failed or timed out: name the worker behind it
            raise self._worker_error(e) from e
        result.deadline = (self.config.tp_step_timeout_s, self._worker_error)
        return result

    def _worker_error(self, cause: BaseException) -> WorkerError:
        # A worker that failed is on its way out (its sockets closed first): give it time to
        # exit, so its own traceback is what gets raised. A step that timed out has none.
        timed_out = isinstance(cause, TimeoutError) or "timed out" in str(cause)
        self.workers.check_alive(wait_s=0.0 if timed_out else 10.0)
        return WorkerError(
            f"tensor-parallel step failed ({cause}); {self.workers.describe_stuck()}"
        )

    @torch.inference_mode()
    def run_worker_step(self, message: np.ndarray) -> None:
        """A worker's side of `launch`: the step rank 0 packed, run on this rank's shards."""
        self._step(self.staging.unpack(message))

    @torch.inference_mode()
    def run_eagerly(self, batch: BatchLike) -> np.ndarray:
        """A step on this rank only, without graphs, waited for (warm-up; every rank plans and
        runs its own). Sampled ids on rank 0; zeros elsewhere."""
        header = self._stage(batch, eager=True)
        return self._read_back(*self._step(header), header.num_sampled).result()

    def _stage(self, batch: BatchLike, eager: bool = False) -> StepHeader:
        """What the runner adds to the staged Batch (the graph plan, the prefill rows'
        cu_seqlens), summed up in the step's header."""
        staging = self.staging
        nd, num_rows = batch.num_decodes, batch.num_seqs
        max_prefill_query_len = 0
        cu = staging.host_view("prefill_cu_seqlens")
        if num_rows > nd:
            qsl = batch.query_start_loc
            cu[: num_rows - nd + 1] = qsl[nd:] - qsl[nd]
            max_prefill_query_len = int(np.diff(cu[: num_rows - nd + 1]).max())
        else:
            cu[0] = 0
        graph_bs, mixed_tokens = 0, 0
        if self.graph_runner is not None and not eager:
            graph_bs, mixed_tokens = self.graph_runner.plan(batch, staging)
        return StepHeader(
            num_tokens=batch.num_tokens,
            num_decodes=nd,
            num_rows=num_rows,
            num_sampled=batch.num_samples,
            width=batch.max_blocks,
            max_prefill_query_len=max_prefill_query_len,
            graph_batch_size=graph_bs,
            mixed_graph_tokens=mixed_tokens,
            all_greedy=bool(batch.all_greedy),
            any_top_k_or_p=bool(batch.any_top_k_or_p),
            any_min_p=bool(batch.any_min_p),
        )

    def _inputs(self, h: StepHeader) -> StepInputs:
        """Upload the staging buffer once and build the step's device views (every rank)."""
        staging = self.staging
        staging.upload()
        nd, num_rows, width = h.num_decodes, h.num_rows, h.width
        meta = None
        if not h.graph_batch_size and not h.mixed_graph_tokens:  # a graph has its own views
            bt, seq_lens = staging.dev_block_tables, staging.dev("seq_lens")
            meta = AttentionMetadata(
                num_decodes=nd,
                slot_mapping=staging.dev("slot_mapping")[: h.num_tokens],
                decode_seq_lens=seq_lens[:nd],
                decode_block_tables=bt[:nd, :width],
                prefill_cu_seqlens_q=staging.dev("prefill_cu_seqlens")[: num_rows - nd + 1],
                prefill_seq_lens=seq_lens[nd:num_rows],
                prefill_block_tables=bt[nd:num_rows, :width],
                max_prefill_query_len=h.max_prefill_query_len,
            )
        views = staging.step_views(h.num_tokens, h.num_sampled)
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

    def run_model(self, inputs: StepInputs) -> torch.Tensor:
        """The forward pass: [T] tokens -> [T, hidden]; replays a CUDA graph where one fits."""
        if inputs.graph_batch_size:
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
            self._resolve_placeholders(input_ids, self.last_sampled)
        return self.model(input_ids, positions, meta)

    def _step(
        self, header: StepHeader, logprobs: LogprobsPlan | None = None
    ) -> tuple[torch.Tensor | None, tuple[Any, Any] | None]:
        """Forward, logits, sampling: the sampled ids on the device (rank 0), else None; and
        the logprobs `logprobs` asks for (device tensors)."""
        inputs = self._inputs(header)
        hidden = self.run_model(inputs)
        if header.num_sampled == 0:
            return None, None
        # logits_indices is strictly increasing, so S == T means every row: skip the gather.
        sampled_hidden = hidden if inputs.samples_every_token else hidden[inputs.logits_indices]
        logits = self.model.compute_logits(sampled_hidden)  # every rank: the LM head gathers
        if self.tp.rank != 0:
            return None, None  # only rank 0 samples
        token_ids = self.sampler(logits, inputs.sampling)
        if logprobs is None:
            return token_ids, None
        scored = compute_logprobs(logprobs, logits, token_ids, hidden, self.model.compute_logits)
        return token_ids, scored

    def _read_back(
        self,
        token_ids: torch.Tensor | None,
        scored: tuple[Any, Any] | None,
        num_sampled: int,
        logprobs: LogprobsPlan | None = None,
    ) -> StepResult:
        """Keep the step's samples on the device for the next step's placeholders, and start
        copying them (and any logprobs) to the host: the ids into one of two pinned buffers,
        so a step's copy never lands on the previous step's ids before they are read."""
        if token_ids is None:
            return StepResult(np.zeros(num_sampled if self.tp.rank == 0 else 0, dtype=np.int64))
        self.last_sampled[:num_sampled].copy_(token_ids)
        pending = None
        if scored is not None:
            pending = (logprobs, start_copy(scored[0]), start_copy(scored[1]))
        if self.device.type != "cuda":
            return StepResult(token_ids.numpy().astype(np.int64), None, pending)
        self._read_back_slot ^= 1
        host = self._read_back_host[self._read_back_slot][:num_sampled]
        host.copy_(self.last_sampled[:num_sampled], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return StepResult(host.numpy(), done, pending)


class StepResult:
    """A launched step's sampled ids (and logprobs): `result()` waits for the copy to the host
    (if any)."""

    __slots__ = ("_done", "_ids", "_logprobs", "deadline")

    def __init__(
        self,
        ids: np.ndarray,
        done: torch.cuda.Event | None = None,
        logprobs: tuple[LogprobsPlan, Any, Any] | None = None,
    ):
        self._ids, self._done, self._logprobs = ids, done, logprobs
        # With tensor parallelism: (seconds, error factory) for a step the GPU never finishes
        # (a worker stuck in a collective leaves rank 0's kernels waiting).
        self.deadline: tuple[float, Any] | None = None

    def result(self) -> np.ndarray:
        if self._done is not None:
            if self.deadline is None:
                self._done.synchronize()
            else:
                timeout_s, error = self.deadline
                give_up = time.monotonic() + timeout_s
                while not self._done.query():
                    if time.monotonic() > give_up:
                        raise error(TimeoutError(f"no result after {timeout_s} s"))
                    time.sleep(1e-4)
            self._ids, self._done = self._ids.copy(), None  # the pinned buffer is reused
        return self._ids

    def logprobs(self) -> StepLogprobs | None:
        """The step's logprobs, once `result()` returned."""
        if self._logprobs is None:
            return None
        plan, sample, prompt = self._logprobs
        return StepLogprobs(plan.sample_rows, as_numpy(sample), plan.prompt_spans, as_numpy(prompt))
