"""Tensor-parallel worker processes: rank 0's handle on them (`TPWorkers`) and their loop.

`tensor_parallel_size=N` spawns N-1 workers. Rank 0 keeps the scheduler; each step it sends the
step header and the used parts of its staging buffer down one pipe per worker, and every rank then
builds the step from its own copy with the same code and runs the forward (the model's collectives
go through the engine's TPGroup). Steps travel over pipes rather than a torch.distributed
broadcast because a worker waits for the next step as long as the engine sits idle, and a
collective would time out; a pipe waits forever and ends with EOF if rank 0 goes away.

A worker that fails sends its traceback up its pipe and exits; rank 0 checks the workers before
every step and, while it waits for a step's ids, every 50 ms (a collective with a dead peer raises
at once on gloo, but on NCCL its kernels just wait).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import sys
import time
import traceback
import weakref
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import numpy as np

from minivllm.config import EngineConfig
from minivllm.distributed import (
    TPGroup,
    WorkerError,
    connect_store,
    create_group,
    create_store,
)
from minivllm.engine.model_runner import ModelRunner
from minivllm.engine.staging import CMD_SHUTDOWN

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

logger = logging.getLogger(__name__)

# How long start-up waits for a spawned worker to reach the store (it imports torch first).
STARTUP_TIMEOUT_S = 300.0
# How long close() waits for a worker to leave its loop before terminating it.
SHUTDOWN_TIMEOUT_S = 10.0

_live: weakref.WeakSet[TPWorkers] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Runs before multiprocessing's own exit hook (registered earlier), so workers get a clean
    # shutdown instead of a terminate.
    for workers in list(_live):
        workers.close()


class TPWorkers:
    """Rank 0's side: the N-1 spawned workers, their pipes, and the group they joined."""

    def __init__(self, config: EngineConfig):
        size = config.tensor_parallel_size
        ctx = mp.get_context("spawn")
        store = create_store(size)
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.group: TPGroup | None = None
        self.failed: str | None = None
        self.num_steps = 0  # steps sent, and each worker's acks of them
        self.num_acked = [0] * (size - 1)
        self.tracebacks: list[str | None] = [None] * (size - 1)
        _live.add(self)
        try:
            for rank in range(1, size):
                parent, child = ctx.Pipe(duplex=True)
                proc = ctx.Process(
                    target=_worker_main,
                    args=(config, rank, store.port, child),
                    name=f"minivllm-tp{rank}",
                    daemon=True,  # never outlive rank 0, even if close() is never reached
                )
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
            self._wait_for_store(store, size)
            self.group = create_group(store, 0, size, config.rank_device(0))
        except BaseException:
            self.close(timeout_s=0.0)
            raise
        logger.info(
            "tensor parallel: %d ranks, workers %s, store 127.0.0.1:%d",
            size,
            [p.pid for p in self.procs],
            store.port,
        )

    def _wait_for_store(self, store: object, size: int) -> None:
        """Wait until every worker has reached the store, failing fast if one died first."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        keys = [f"joined/{rank}" for rank in range(1, size)]
        while not store.check(keys):
            self.check_alive()
            if time.monotonic() > deadline:
                raise WorkerError(
                    f"tensor-parallel workers did not start within {STARTUP_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.02)

    def check_alive(self, wait_s: float = 0.0) -> None:
        """Raise WorkerError naming the first worker that has exited (with its traceback).
        `wait_s`: give a worker that is on its way out that long to finish exiting."""
        if self.failed is not None:
            raise WorkerError(self.failed)
        if wait_s > 0:
            ready = mp.connection.wait([p.sentinel for p in self.procs], timeout=wait_s)
            for proc in self.procs:
                if proc.sentinel in ready:  # it closes as the worker exits, a moment before
                    proc.join(wait_s)  # the exit status can be collected: wait for that
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            if proc.exitcode is None:
                continue
            self._drain(rank - 1)
            traceback_text = self.tracebacks[rank - 1]
            detail = f":\n{traceback_text}" if traceback_text else ""
            self.failed = (
                f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code "
                f"{proc.exitcode}{detail}"
            )
            raise WorkerError(self.failed)

    def send(self, message: np.ndarray) -> None:
        """Hand one int32 message (a step: header + payload) to every worker."""
        self.check_alive()
        self._drain_acks()
        self.num_steps += 1
        data = memoryview(message).cast("B")
        for conn in self.conns:
            try:
                conn.send_bytes(data)
            except OSError:
                self.check_alive()
                raise

    def _drain_acks(self) -> None:
        for i in range(len(self.conns)):
            self._drain(i)

    def _drain(self, i: int) -> None:
        """Read what worker i sent: an ack per finished step, or its traceback."""
        conn = self.conns[i]
        try:
            while conn.poll():
                message = conn.recv_bytes()
                if message == _ACK:
                    self.num_acked[i] += 1
                else:
                    self.tracebacks[i] = message.decode(errors="replace")
        except (EOFError, OSError):
            pass

    def describe_stuck(self) -> str:
        """Which workers have not finished the last step sent, and their state."""
        self._drain_acks()
        stuck = []
        for rank, (proc, acked) in enumerate(zip(self.procs, self.num_acked), start=1):
            if acked < self.num_steps:
                stuck.append(f"rank {rank} (pid {proc.pid}{_process_state(proc.pid)})")
        if not stuck:
            return "every worker finished it: rank 0 itself is behind"
        return "not finished by tensor-parallel worker " + ", ".join(stuck)

    def close(self, timeout_s: float | None = None) -> None:
        """Ask every worker to leave its loop, then reap it (terminate stragglers); a timeout
        of 0 terminates at once (start-up failed, workers may be inside a collective)."""
        if timeout_s is None:
            timeout_s = SHUTDOWN_TIMEOUT_S
        _live.discard(self)
        if not self.conns:
            return  # already closed
        shutdown = np.array([CMD_SHUTDOWN], dtype=np.int32)
        for proc, conn in zip(self.procs, self.conns):
            if proc.exitcode is None:
                try:
                    conn.send_bytes(shutdown.tobytes())
                except OSError:
                    pass
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            if _process_state(proc.pid):  # stopped: it will never read the shutdown
                proc.kill()
            proc.join(max(deadline - time.monotonic(), 0.0))
            if proc.exitcode is None:
                if timeout_s > 0:
                    logger.warning(
                        "tensor-parallel worker pid %d did not exit; terminating", proc.pid
                    )
                proc.terminate()
                proc.join(SHUTDOWN_TIMEOUT_S)
                if proc.exitcode is None:  # a stopped process ignores SIGTERM until continued
                    proc.kill()
                    proc.join(SHUTDOWN_TIMEOUT_S)
        for conn in self.conns:
            conn.close()
        self.conns = []
        self.group = None


def _worker_main(config: EngineConfig, rank: int, port: int, conn: Connection) -> None:
    """A worker process: join the group, build the same runner as rank 0, serve steps."""
    try:
        store = connect_store(port, config.tensor_parallel_size)
        store.set(f"joined/{rank}", "1")
        device = config.rank_device(rank)
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        group = create_group(store, rank, config.tensor_parallel_size, device)
        runner = ModelRunner(config, tp_group=group)
        while True:
            try:
                message = np.frombuffer(conn.recv_bytes(), dtype=np.int32)
            except EOFError:  # rank 0 went away without a shutdown
                break
            if message[0] == CMD_SHUTDOWN:
                break
            runner.run_worker_step(message)
            conn.send_bytes(_ACK)
    except BaseException:  # noqa: BLE001 - any failure goes up the pipe, then exit 1
        try:
            conn.send_bytes(traceback.format_exc().encode())
        except OSError:
            pass
        _exit(1)
    _exit(0)


_ACK = b"\x01"  # a worker finished a step


def _process_state(pid: int) -> str:
    """ ", stopped" for a stopped process (SIGSTOP, a debugger), from /proc where there is one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
    return ", stopped" if state in ("T", "t") else ""


def _exit(code: int) -> None:
    """Leave without running destructors: tearing down the c10d backend and store at
    interpreter exit can abort the process (a joinable thread destroyed), and there is
    nothing left to save."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
