"""How the engine benchmarks drive and watch engine steps: the only code in benchmarks/ that uses
the model runner's step API (`runner.staging` with `engine.staging.schedule_into`,
`runner.launch`, `runner.graph_runner`)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import triton
from bench_common import allocator_counters
from minivllm import LLM
from minivllm.engine.staging import schedule_into


class StepLoop:
    """The engine's loop, schedule (into the staging buffer) -> launch -> update, driven by hand
    so that a benchmark can time its parts. With async scheduling step N+1 is launched before
    step N's ids are read back, as in LLM.generate."""

    def __init__(self, llm: LLM) -> None:
        self.runner, self.scheduler = llm.model_runner, llm.scheduler
        self.staging = self.runner.staging
        self.depth = 2 if llm.config.async_scheduling else 1
        self.in_flight: deque[Any] = deque()  # launched steps' results, oldest first

    def schedule(self) -> Any:
        """The next Batch, written into the staging buffer once its last upload has left it."""
        return schedule_into(self.scheduler, self.staging)

    def step(self) -> tuple[Any, float]:
        """One schedule + launch; then, while `depth` steps are in flight, the oldest is read
        back and passed to update(). Returns the Batch and the host seconds spent in schedule and
        update."""
        t0 = time.perf_counter()
        batch = self.schedule()
        host = time.perf_counter() - t0
        if batch is None:
            raise RuntimeError("nothing to schedule: the benchmark ran out of requests")
        result = self.runner.launch(batch)
        if batch.num_samples:  # a Batch without sampled rows needs no update()
            self.in_flight.append(result)
        while len(self.in_flight) >= self.depth:
            token_ids = self.in_flight.popleft().result()
            t1 = time.perf_counter()
            self.scheduler.update(token_ids)
            host += time.perf_counter() - t1
        return batch, host

    def step_until_decoding(self) -> None:
        """Steps until one is decode-only (every prompt prefilled)."""
        while True:
            batch, _ = self.step()
            if batch.num_decodes == batch.num_seqs:
                return

    def drain(self) -> None:
        while self.in_flight:
            self.scheduler.update(self.in_flight.popleft().result())

    def step_phases(self, sync: Callable[[], None]) -> tuple[Any, dict[str, float]]:
        """One step, phase by phase, each followed by `sync` (the device's) so that each shows its
        own cost: schedule; launch (staging upload, then a graph replay or the eager kernel
        launches); wait (the GPU's work and the ids' copy back); update. Seconds per phase."""
        self.drain()
        sync()
        t0 = time.perf_counter()
        batch = self.schedule()
        t1 = time.perf_counter()
        result = self.runner.launch(batch)
        t2 = time.perf_counter()
        sync()
        t3 = time.perf_counter()
        token_ids = result.result()
        t4 = time.perf_counter()
        self.scheduler.update(token_ids)
        t5 = time.perf_counter()
        return batch, {
            "schedule": t1 - t0,
            "launch": t2 - t1,
            "launch_to_idle": t3 - t1,
            "read_back": t4 - t3,
            "update": t5 - t4,
        }

    def graph_launch_seconds(self, sync: Callable[[], None], rows: int) -> dict[int, float]:
        """Host seconds to launch the decode graph a step of `rows` decodes replays (median of
        10, the GPU idle before each), as {batch size: seconds}; empty without graphs. It
        replays the last staged step (its KV slots are written again): call it right after a
        decode-only step of `rows` rows, while its sequences still run. Another bucket's graph
        would read that step's row order out of its own bounds."""
        graphs = self.runner.graph_runner
        batch_size = (
            min((b for b in graphs.batch_sizes if b >= rows), default=None) if graphs else None
        )
        if batch_size is None:
            return {}
        samples = []
        for _ in range(10):
            sync()
            t0 = time.perf_counter()
            graphs.replay(batch_size)
            samples.append(time.perf_counter() - t0)
        sync()
        return {batch_size: float(np.median(samples))}


@dataclass
class StepRecord:
    """One step of a recorded run (perf_counter seconds)."""

    launched: float
    host_s: float  # spent inside launch
    read: float | None  # when its sampled ids were read back; None: no sampled rows
    num_tokens: int
    num_decodes: int
    num_samples: int
    context_tokens: int  # sum of the rows' seq_lens
    pairs: int  # causal (query, key) pairs of its attention
    # With StepRecorder(watch=True): what its launch did besides launching, each a cost the
    # step's time pays once (a cudaMalloc; a retried one frees the allocator's cache first) ...
    cuda_mallocs: int = 0
    alloc_retries: int = 0
    # ... and the Triton kernels compiled (or loaded from the disk cache) since the last launch.
    compiles: tuple[str, ...] = ()


class StepRecorder:
    """While active, wraps the runner's `launch` to record every step the engine runs (the
    engine's own loop, e.g. inside LLM.generate). With `watch`, each record also counts the
    allocator's cudaMalloc calls inside its launch and the Triton compiles since the last one
    (reading the allocator's counters costs tens of microseconds a step: for profiles)."""

    def __init__(self, llm: LLM, watch: bool = False) -> None:
        self.runner = llm.model_runner
        self.records: list[StepRecord] = []
        self.watch = watch
        self._compiled: list[str] = []
        self._hook_before: Any = None

    def __enter__(self) -> StepRecorder:  # noqa: PYI034 - py310 has no typing.Self
        real_launch, staging, records = self.runner.launch, self.runner.staging, self.records
        counters = allocator_counters if self.watch else dict
        compiled = self._compiled
        if self.watch:
            self._hook_before = triton.knobs.runtime.jit_post_compile_hook
            triton.knobs.runtime.jit_post_compile_hook = self._on_compile

        def launch(batch: Any, *args: Any) -> _TimedResult:  # args: the runner's own
            seq_lens = staging.host_view("seq_lens")[: batch.num_seqs].astype(np.int64)
            new = np.diff(batch.query_start_loc).astype(np.int64)
            pairs = int((new * (seq_lens - (new - 1) / 2)).sum())
            before = counters()
            launched = time.perf_counter()
            result = real_launch(batch, *args)
            host_s = time.perf_counter() - launched
            after = counters()
            record = StepRecord(
                launched=launched,
                host_s=host_s,
                read=None,
                num_tokens=int(batch.num_tokens),
                num_decodes=int(batch.num_decodes),
                num_samples=int(batch.num_samples),
                context_tokens=int(seq_lens.sum()),
                pairs=pairs,
                cuda_mallocs=after.get("cuda_mallocs", 0) - before.get("cuda_mallocs", 0),
                alloc_retries=after.get("alloc_retries", 0) - before.get("alloc_retries", 0),
                compiles=tuple(compiled),
            )
            compiled.clear()
            records.append(record)
            return _TimedResult(result, record)

        self.runner.launch = launch  # an instance attribute shadows the method
        return self

    def _on_compile(self, *args: Any, **kwargs: Any) -> Any:
        fn = kwargs.get("fn")
        self._compiled.append(getattr(fn, "name", None) or str(kwargs.get("key", "?")))
        chained = self._hook_before
        return chained(*args, **kwargs) if chained is not None else None

    def __exit__(self, *exc_info: object) -> None:
        # Back to the method: the closure would otherwise keep the engine alive.
        del self.runner.launch
        if self.watch:
            triton.knobs.runtime.jit_post_compile_hook = self._hook_before


class _TimedResult:
    """A launched step's result that notes when its ids were read back."""

    def __init__(self, inner: Any, record: StepRecord) -> None:
        self._inner, self._record = inner, record

    def result(self) -> np.ndarray:
        token_ids = self._inner.result()
        if self._record.read is None:
            self._record.read = time.perf_counter()
        return token_ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
