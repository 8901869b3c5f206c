"""The engine loop, one for offline and online use: intake -> schedule -> launch -> update.

`EngineLoop` owns the model runner (and its tensor-parallel workers) and the scheduler. Requests
and aborts may be handed in from any thread (`add`, `abort`): they wait in an intake queue that
`step` drains between steps, so the scheduler, single-threaded by contract, is only ever touched
by the thread that drives the loop. One `step`:

    drain the intake -> schedule into the staging buffer -> launch -> read back -> update

With async scheduling the next step is scheduled and launched before the previous one's sampled
ids are read back, so the host plans while the GPU runs: a `step` then launches step N+1 and
reads back step N. Each step returns what it read back (`StepOutput`): the sampled token of every
row and the sequences that finished. Text, stop strings and per-request outputs are the output
processor's business (engine/output_processor.py); this loop only sees token ids.

A step that raises (an interrupt while waiting for the GPU, a failed launch) leaves a Batch that
never saw its update(); `recover` aborts every sequence, closes those Batches and forgets the
prefix cache (a block registered by a step that never ran holds no valid K/V), after which the
loop is ready for new requests.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minivllm.config import EngineConfig
from minivllm.distributed import SINGLE_DEVICE
from minivllm.engine import RuntimeInfo, logprobs, new_scheduler
from minivllm.engine.logprobs import StepLogprobs
from minivllm.engine.model_runner import ModelRunner, StepResult
from minivllm.engine.staging import schedule_into
from minivllm.engine.workers import TPWorkers

logger = logging.getLogger(__name__)


@dataclass
class EngineRequest:
    """One sequence for the scheduler: validated, tokenized, with its own seed."""

    seq_id: int
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # top-N logprobs of each sampled token
    prompt_logprobs: int | None = None  # top-N logprobs of each prompt token (no cache hits)


@dataclass
class StepOutput:
    """What one `step` read back, and what it launched."""

    sampled_seq_ids: np.ndarray  # int64 [S]: the sequence of each sampled row, in row order
    token_ids: np.ndarray  # int64 [S]: its token (rows of sequences that ended are ignored)
    num_decodes: int  # rows [0, num_decodes) were decodes; later rows ended a prefill
    finished: list[tuple[int, str, list[int]]]  # (seq_id, finish_reason, output token ids)
    launched_prefill_seq_ids: np.ndarray  # int64: sequences with a prefill row in the launch
    num_prefill_tokens: int  # prefill tokens of the steps read back or launched without samples
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (seq_id, why) at intake
    # Of the step read back (and of a prefill chunk launched without samples), for the rows
    # that asked.
    logprobs: list[StepLogprobs] = field(default_factory=list)

    @classmethod
    def empty(cls) -> StepOutput:
        none = np.zeros(0, dtype=np.int64)
        return cls(none, none, 0, [], none, 0)


class EngineLoop:
    """The model runner, the scheduler, the intake queue and the steps in flight."""

    def __init__(self, config: EngineConfig, eos_token_ids: tuple[int, ...]):
        self.config = config
        workers = TPWorkers(config) if config.tensor_parallel_size > 1 else None
        try:
            group = workers.group if workers is not None else SINGLE_DEVICE
            self.runner = ModelRunner(config, group, workers)
        except BaseException as e:
            if workers is not None:
                try:
                    if isinstance(e, RuntimeError):
                        # A collective failed: if a worker died first, raise its traceback.
                        workers.check_alive(wait_s=2.0)
                finally:
                    workers.close(timeout_s=0.0)
            raise
        num_blocks = self.runner.kv_cache_info.num_blocks
        self.scheduler = new_scheduler(config, num_blocks)
        self.runtime = RuntimeInfo(
            num_kv_blocks=num_blocks,
            eos_token_ids=eos_token_ids,
            vocab_size=config.model_config.vocab_size,
        )
        self._lock = threading.Lock()
        self._intake: deque[tuple[str, Any]] = deque()  # ("add", EngineRequest) | ("abort", id)
        self._has_intake = threading.Event()
        # Launched Batches with sampled rows whose ids have not been through update() yet, oldest
        # first; the StepResult is None while the launch is under way.
        self._in_flight: deque[tuple[Any, StepResult | None]] = deque()
        self._depth = 2 if config.async_scheduling else 1
        self._active: set[int] = set()  # sequences added and not finished or aborted
        # The sequences that asked for logprobs: seq_id -> top-N (and, for the prompt's, its
        # ids and the first position not yet scored).
        self._sample_top: dict[int, int] = {}
        self._prompt_top: dict[int, tuple[int, list[int], list[int]]] = {}

    # ---- intake (any thread) ---------------------------------------------------------------

    def add(self, request: EngineRequest) -> None:
        with self._lock:
            self._intake.append(("add", request))
            self._has_intake.set()

    def abort(self, seq_id: int) -> None:
        """Drop a sequence (waiting, running or still in the intake); unknown ids are ignored."""
        with self._lock:
            self._intake.append(("abort", seq_id))
            self._has_intake.set()

    def wait_for_intake(self, timeout: float | None = None) -> bool:
        """Block until something was handed in (an idle online loop waits here)."""
        return self._has_intake.wait(timeout)

    # ---- the loop (one thread) -------------------------------------------------------------

    @property
    def num_unfinished_seqs(self) -> int:
        return len(self._active)

    def has_work(self) -> bool:
        return bool(self._intake) or self.scheduler.has_unfinished() or bool(self._in_flight)

    def step(self) -> StepOutput:
        """Drain the intake, launch the next step (if any), read back the oldest in flight."""
        rejected = self._drain_intake()
        runner, scheduler, in_flight = self.runner, self.scheduler, self._in_flight
        batch = None
        launched = np.zeros(0, dtype=np.int64)
        num_prefill = 0
        chunk_logprobs = None
        if scheduler.has_unfinished():
            batch = schedule_into(scheduler, runner.staging)
            if batch is None and not in_flight:
                raise RuntimeError("the scheduler has unfinished requests but scheduled none")
        if batch is not None:
            launched = batch.seq_ids[batch.num_decodes :]
            plan = None
            if self._sample_top or self._prompt_top:
                seq_lens = runner.staging.host_view("seq_lens")[: batch.num_seqs]
                plan = logprobs.plan(batch, seq_lens, self._sample_top, self._prompt_top)
            if batch.num_samples:
                in_flight.append((batch, None))  # awaits update() from here on
                in_flight[-1] = (batch, runner.launch(batch, plan))
            else:  # nothing to deliver: such a Batch needs no update()
                result = runner.launch(batch, plan)
                num_prefill += batch.num_tokens - batch.num_decodes
                if plan is not None:  # prompt logprobs of a chunk: waited for here (rare)
                    chunk_logprobs = result.logprobs()
        if not in_flight or (batch is not None and len(in_flight) < self._depth):
            out = StepOutput.empty()
            out.launched_prefill_seq_ids, out.num_prefill_tokens = launched, num_prefill
            out.rejected = rejected
            out.logprobs = [chunk_logprobs] if chunk_logprobs is not None else []
            return out
        # Read back the oldest step (the GPU works on the newer one meanwhile). It leaves
        # in_flight only once update() took its ids: anything raised before leaves it for
        # recover() to close.
        done, result = in_flight[0]
        token_ids = result.result()
        finished = scheduler.update(token_ids)
        in_flight.popleft()
        for seq_id, _, _ in finished:
            self._forget(seq_id)
        return StepOutput(
            sampled_seq_ids=done.sample_seq_ids,
            token_ids=token_ids,
            num_decodes=int(done.num_decodes),
            finished=finished,
            launched_prefill_seq_ids=launched,
            num_prefill_tokens=num_prefill + done.num_tokens - done.num_decodes,
            rejected=rejected,
            logprobs=[lp for lp in (chunk_logprobs, result.logprobs()) if lp is not None],
        )

    def _forget(self, seq_id: int) -> None:
        self._active.discard(seq_id)
        self._sample_top.pop(seq_id, None)
        self._prompt_top.pop(seq_id, None)

    def _drain_intake(self) -> list[tuple[int, str]]:
        with self._lock:
            items = list(self._intake)
            self._intake.clear()
            self._has_intake.clear()
        rejected: list[tuple[int, str]] = []
        eos, vocab = self.runtime.eos_token_ids, self.runtime.vocab_size
        for kind, item in items:
            if kind == "abort":
                if item in self._active:
                    self._forget(item)
                    self.scheduler.abort(item)
                continue
            r: EngineRequest = item
            extra = {"skip_prefix_cache": True} if r.prompt_logprobs is not None else {}
            try:
                self.scheduler.add_request(
                    r.seq_id,
                    r.prompt_token_ids,
                    r.max_tokens,
                    ignore_eos=r.ignore_eos,
                    eos_token_ids=eos,
                    stop_token_ids=r.stop_token_ids,
                    temperature=r.temperature,
                    top_p=r.top_p,
                    top_k=r.top_k,
                    min_p=r.min_p,
                    vocab_size=vocab,
                    seed=r.seed,
                    **extra,
                )
            except ValueError as e:
                rejected.append((r.seq_id, str(e)))
                continue
            self._active.add(r.seq_id)
            if r.logprobs is not None:
                self._sample_top[r.seq_id] = r.logprobs
            if r.prompt_logprobs is not None:
                self._prompt_top[r.seq_id] = (r.prompt_logprobs, r.prompt_token_ids, [0])
        return rejected

    def recover(self) -> list[int]:
        """After a step raised: abort every sequence, close the Batches in flight, forget the
        prefix cache. Returns the sequences dropped (for the caller to fail their requests);
        the loop is usable again."""
        with self._lock:
            dropped = [item.seq_id for kind, item in self._intake if kind == "add"]
            self._intake.clear()
            self._has_intake.clear()
        scheduler = self.scheduler
        for seq_id in self._active:
            scheduler.abort(seq_id)
        dropped += self._active
        self._active.clear()
        self._sample_top.clear()
        self._prompt_top.clear()
        while self._in_flight:
            batch, _ = self._in_flight.popleft()
            scheduler.update(np.zeros(batch.num_samples, dtype=np.int64))  # all rows aborted
        reset = getattr(scheduler, "reset_prefix_cache", None)
        if reset is not None:
            reset()
        return sorted(dropped)

    def close(self) -> None:
        self.runner.close()
