"""ModelRunner: builds the model and its paged KV cache, and runs one scheduler Batch per launch.

A step: the scheduler has written the Batch into the staging buffer (engine/staging.py); `launch`
adds what only the runner writes (the CUDA-graph plan, the prefill rows' offsets), uploads the
buffer with one copy, runs the model (replaying a captured graph where one fits), computes logits
only at the sampled rows, samples on the device and starts copying the ids back into one of two
pinned buffers. It never waits: `StepResult.result()` is the step's only sync, and the ids also
stay on the device, where the next step's placeholder inputs (async scheduling) read them.

With tensor_parallel_size=N, rank 0's runner sends each step (a header and the used part of the
staging buffer) to the N-1 workers (engine/workers.py), which run this same class on their own
ranks: same views, same forward (the layers' collectives line up), same logits. Rank 0 samples;
with async scheduling every rank samples too, from the same gathered logits with the same
uniforms (the staging buffer's), so each rank holds the ids its next step's placeholders read.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import torch

from minivllm.config import EngineConfig
from minivllm.distributed import SINGLE_DEVICE, TPGroup, WorkerError, building_model
from minivllm.engine import kv_cache, warmup
from minivllm.engine.cuda_graphs import CudaGraphRunner, GraphInputs
from minivllm.engine.logprobs import LogprobsPlan, StepLogprobs, as_numpy, start_copy
from minivllm.engine.logprobs import compute as compute_logprobs
from minivllm.engine.staging import BatchLike, StagingBuffers, StepHeader, StepInputs
from minivllm.layers import fused_kernels_on
from minivllm.layers.attention import AttentionMetadata, get_attention_backend
from minivllm.layers.sampler import Sampler
from minivllm.models.qwen3 import MODEL_REGISTRY
from minivllm.weights import init_dummy_weights, load_weights

logger = logging.getLogger(__name__)


class StepSender(Protocol):
    """Rank 0's handle on the tensor-parallel workers (engine/workers.py: TPWorkers)."""

    def send(self, message: np.ndarray) -> None: ...
    def check_alive(self, wait_s: float = 0.0) -> None: ...
    def close(self, timeout_s: float | None = None) -> None: ...


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
            warmup.warm_up_lm_head(self)
            warmup.warm_up_graph_steps(self)
            torch.cuda.synchronize(self.device)
        # Start-up is over: from here a collective waiting on a peer means a step is stuck.
        self.tp.timeout = datetime.timedelta(seconds=config.tp_step_timeout_s)

    def _capture_cuda_graphs(self) -> CudaGraphRunner:
        from minivllm.kernels.flash_prefill import tile_config

        config, mc = self.config, self.config.model_config
        group = mc.num_attention_heads // mc.num_key_value_heads

        def tokens_per_tile(num_tokens: int) -> int:  # the prefill kernel's, for a launch
            block_m = tile_config(
                config.block_size, group, self.num_kv_heads, num_tokens, self.device
            )[0]
            return block_m // group

        # The tile table packs rows into 15 bits, and its length is a grid dimension (< 2^16).
        num_tiles = self.staging.layout.size("prefill_tiles")
        fits = config.max_num_seqs < 1 << 15 and num_tiles < 1 << 16
        runner = CudaGraphRunner(
            self._forward,
            GraphInputs.from_staging(self.staging),
            config.max_num_seqs,
            mixed_tokens=config.max_num_batched_tokens if fits else 0,
            tokens_per_tile=tokens_per_tile,
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
        result.watch = self.workers.check_alive
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
        """A worker's side of `launch`: the step rank 0 packed, run on this rank's shards. With
        async scheduling the sampled ids stay on the device for the next step's placeholders."""
        header = self.staging.unpack(message)
        token_ids, _ = self._step(header)
        if token_ids is not None:
            self.last_sampled[: header.num_sampled].copy_(token_ids)

    @torch.inference_mode()
    def run_eagerly(self, batch: BatchLike) -> np.ndarray:
        """A step on this rank only, without graphs, waited for (warm-up; every rank plans and
        runs its own). Sampled ids on rank 0; zeros elsewhere."""
        header = self._stage(batch, eager=True)
        return self._read_back(*self._step(header), header.num_sampled).result()

    def _stage(self, batch: BatchLike, eager: bool = False) -> StepHeader:
        """What the runner adds to the staged Batch (the prefill rows' offsets, the CUDA-graph
        plan), summed up in the step's header."""
        header = self.staging.stage(batch)
        if self.graph_runner is None or eager:
            return header
        graph_bs, mixed_tokens = self.graph_runner.plan(batch, self.staging)
        return replace(header, graph_batch_size=graph_bs, mixed_graph_tokens=mixed_tokens)

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
        """Forward, logits, sampling: the sampled ids on the device (rank 0, and every rank with
        async scheduling), else None; and the logprobs `logprobs` asks for (device tensors,
        rank 0)."""
        inputs = self.staging.step_inputs(header)
        hidden = self.run_model(inputs)
        if header.num_sampled == 0:
            if logprobs is None or self.tp.rank != 0:
                return None, None
            # A prefill chunk that samples nothing may still score prompt tokens.
            return None, compute_logprobs(logprobs, None, None, hidden, self.model.compute_logits)
        # logits_indices is strictly increasing, so S == T means every row: skip the gather.
        sampled_hidden = hidden if inputs.samples_every_token else hidden[inputs.logits_indices]
        logits = self.model.compute_logits(sampled_hidden)  # every rank: the LM head gathers
        if self.tp.rank != 0 and not self.config.async_scheduling:
            return None, None  # only rank 0 needs the ids
        token_ids = self.sampler(logits, inputs.sampling)
        if logprobs is None or self.tp.rank != 0:
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
        pending = None
        if scored is not None:
            pending = (logprobs, start_copy(scored[0]), start_copy(scored[1]))
        if token_ids is None:
            ids = np.zeros(num_sampled if self.tp.rank == 0 else 0, dtype=np.int64)
        else:
            self.last_sampled[:num_sampled].copy_(token_ids)
            if self.device.type != "cuda":
                ids = token_ids.numpy().astype(np.int64)
            else:
                self._read_back_slot ^= 1
                host = self._read_back_host[self._read_back_slot][:num_sampled]
                host.copy_(self.last_sampled[:num_sampled], non_blocking=True)
                ids = host.numpy()
        done = None
        if self.device.type == "cuda" and (token_ids is not None or pending is not None):
            done = torch.cuda.Event()
            done.record()
        return StepResult(ids, done, pending)


class StepResult:
    """A launched step's sampled ids (and logprobs): `result()` waits for the copy to the host
    (if any)."""

    __slots__ = ("_done", "_ids", "_logprobs", "deadline", "watch")

    WATCH_EVERY_S = 0.05

    def __init__(
        self,
        ids: np.ndarray,
        done: torch.cuda.Event | None = None,
        logprobs: tuple[LogprobsPlan, Any, Any] | None = None,
    ):
        self._ids, self._done, self._logprobs = ids, done, logprobs
        # With tensor parallelism: (seconds, error factory) for a step the GPU never finishes
        # (a worker stuck in a collective leaves rank 0's kernels waiting), and a check that
        # raises WorkerError once a worker has died, run every WATCH_EVERY_S while waiting (a
        # dead peer leaves NCCL's kernels waiting without an error).
        self.deadline: tuple[float, Any] | None = None
        self.watch: Any = None

    def result(self) -> np.ndarray:
        if self._done is not None:
            if self.deadline is None:
                self._done.synchronize()
            else:
                timeout_s, error = self.deadline
                give_up = time.monotonic() + timeout_s
                next_watch = time.monotonic() + self.WATCH_EVERY_S
                while not self._done.query():
                    now = time.monotonic()
                    if now > give_up:
                        raise error(TimeoutError(f"no result after {timeout_s} s"))
                    if self.watch is not None and now > next_watch:
                        self.watch()
                        next_watch = now + self.WATCH_EVERY_S
                    time.sleep(1e-4)
            self._ids, self._done = self._ids.copy(), None  # the pinned buffer is reused
        return self._ids

    def logprobs(self) -> StepLogprobs | None:
        """The step's logprobs (waits like `result()`)."""
        if self._logprobs is None:
            return None
        self.result()
        plan, sample, prompt = self._logprobs
        return StepLogprobs(plan.sample_rows, as_numpy(sample), plan.prompt_spans, as_numpy(prompt))
