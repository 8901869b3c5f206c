"""Data parallelism without Ray: one engine process per replica on this host.

The same replica code as over Ray (batch_runner.BatchRunner, one LLM per replica), with
processes and pipes for transport, for hosts where Ray is not installed (our GPU machines) and
for the benchmark. Replica i is a spawned process that sees GPUs [i * tp, (i + 1) * tp) of the
visible ones (CUDA_VISIBLE_DEVICES), or the CPU. Lines go to the replicas with room (each holds
at most its engine's look-ahead plus a margin, so its running set stays full while the driver
refills it, and memory stays bounded); results come back line by line as they finish.

Faults, as Ray Data handles them: a replica whose process dies (killed, or a step that raised)
costs only its unfinished lines, which go to the other replicas, and a new process takes its
place (at most `MAX_RESTARTS` times per replica; the others carry on meanwhile). A line that was
running on `MAX_ATTEMPTS` replicas that died gets an error line instead of another try. When
every replica is gone for good the run stops with what it wrote (a rerun resumes).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from minivllm.entrypoints.batch_file import InputLine, Result, error_result, parse_line
from minivllm.entrypoints.batch_runner import Put

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # replicas a line may be running on when they die
MAX_RESTARTS = 3  # new processes per replica
STARTUP_TIMEOUT_S = 900.0
REPLICA_FAILED = "replica_failed"

_env_lock = threading.Lock()  # CUDA_VISIBLE_DEVICES is set around each start


# ---- the replica process ----------------------------------------------------------------------


def _replica_main(
    conn: Connection, model: str, names: list[str], engine_args: dict[str, Any]
) -> None:
    """One replica: build the engine, then run the lines the driver sends until it says end."""
    from minivllm.entrypoints.batch_runner import BatchRunner
    from minivllm.llm import LLM

    try:
        llm = LLM(model, **engine_args)
        runner = BatchRunner(llm, names)
    except BaseException:  # noqa: BLE001 - start-up failures go up the pipe
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", runner.max_lines_in_flight))
    buffer: deque[InputLine] = deque()
    is_ended = False

    def take(room: int, block: bool) -> list[InputLine] | None:
        nonlocal is_ended
        while not is_ended and (conn.poll(0) or (block and not buffer)):
            kind, payload = conn.recv()
            if kind == "lines":
                buffer.extend(payload)
            else:
                is_ended = True
        if buffer:
            return [buffer.popleft() for _ in range(min(room, len(buffer)))]
        return None if is_ended else []

    def put(results: list[Result]) -> None:
        conn.send(("results", results))

    try:
        runner.run(take, put)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the driver went away
    finally:
        llm.close()


# ---- the driver -------------------------------------------------------------------------------


def replica_devices(num_replicas: int, engine_args: dict[str, Any]) -> list[str | None]:
    """Each replica's CUDA_VISIBLE_DEVICES (None: leave it as it is, e.g. on the CPU)."""
    tp = int(engine_args.get("tensor_parallel_size", 1))
    device = engine_args.get("device")
    if device is not None and not str(device).startswith("cuda"):
        return [None] * num_replicas
    if device not in (None, "cuda"):
        raise ValueError(
            f"device={device!r} names one GPU; with data parallelism each replica gets its own "
            "(leave the device unset, or 'cuda')"
        )
    import torch

    num_gpus = torch.cuda.device_count()
    if num_gpus == 0:
        if device is None:
            return [None] * num_replicas  # the engines run on the CPU
        raise ValueError("device='cuda' but no CUDA GPU is visible")
    if num_replicas * tp > num_gpus:
        raise ValueError(
            f"{num_replicas} replicas x tensor_parallel_size {tp} need {num_replicas * tp} GPUs; "
            f"{num_gpus} are visible"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(num_gpus)]
    return [",".join(ids[i * tp : (i + 1) * tp]) for i in range(num_replicas)]


@dataclass(eq=False)
class _Replica:
    index: int
    proc: BaseProcess
    conn: Connection
    started: float
    window: int = 0  # lines it may hold; 0 until it is ready
    outstanding: dict[int, InputLine] = field(default_factory=dict)  # by line number


class _Pool:
    """The replica processes, the lines each holds, and what to do when one dies."""

    def __init__(
        self,
        num_replicas: int,
        model: str,
        names: list[str],
        engine_args: dict[str, Any],
        write: Put,
    ):
        self.devices = replica_devices(num_replicas, engine_args)
        self.model, self.names, self.engine_args, self.write = model, names, engine_args, write
        self.restarts = [0] * num_replicas
        self.live: list[_Replica] = []
        self.retry: deque[InputLine] = deque()
        self.attempts: dict[int, int] = {}
        for i in range(num_replicas):
            self.live.append(self._start(i))

    def _start(self, index: int) -> _Replica:
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe(duplex=True)
        # Not a daemon: a daemonic process may not start tensor-parallel workers.
        proc = ctx.Process(
            target=_replica_main,
            args=(child, self.model, self.names, self.engine_args),
            name=f"minivllm-replica-{index}",
        )
        devices = self.devices[index]
        with _env_lock:
            saved = os.environ.get("CUDA_VISIBLE_DEVICES")
            try:
                if devices is not None:
                    os.environ["CUDA_VISIBLE_DEVICES"] = devices
                proc.start()
            finally:
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved
        child.close()
        return _Replica(index, proc, conn, time.monotonic())

    def wait_ready(self) -> None:
        """Until every replica has started (a start-up failure raises)."""
        while any(not r.window for r in self.live):
            self.poll(timeout=1.0)
            for r in self.live:
                if not r.window and time.monotonic() - r.started > STARTUP_TIMEOUT_S:
                    raise RuntimeError(f"replica {r.index} did not start in {STARTUP_TIMEOUT_S} s")

    def dispatch(self, lines: Iterator[InputLine]) -> None:
        """Hand out lines and collect results until every line has a result."""
        is_exhausted = False
        while True:
            for r in self.live:
                room = r.window - len(r.outstanding)
                chunk: list[InputLine] = []
                while len(chunk) < room and self.retry:
                    chunk.append(self.retry.popleft())
                if len(chunk) < room and not is_exhausted:
                    for line in lines:
                        chunk.append(line)
                        if len(chunk) == room:
                            break
                    else:
                        is_exhausted = True
                if chunk:
                    r.outstanding.update((line.number, line) for line in chunk)
                    try:
                        r.conn.send(("lines", chunk))
                    except OSError:
                        pass  # it died: poll() finds out
            if is_exhausted and not self.retry and not any(r.outstanding for r in self.live):
                return
            self.poll(timeout=None)

    def poll(self, timeout: float | None) -> None:
        """Take the messages the replicas sent (waiting up to `timeout` for one); replace the
        replicas that died."""
        if not self.live:
            raise RuntimeError(
                "every replica died; the results so far are written (a rerun resumes)"
            )
        ready = wait([r.conn for r in self.live] + [r.proc.sentinel for r in self.live], timeout)
        for r in list(self.live):
            if r.conn not in ready and r.proc.sentinel not in ready:
                continue
            try:
                while r.conn.poll(0):
                    self._receive(r, *r.conn.recv())
                if r.proc.sentinel not in ready:
                    continue
            except (EOFError, OSError):
                pass
            self._lost(r)

    def _receive(self, r: _Replica, kind: str, payload: Any) -> None:
        if kind == "results":
            for res in payload:
                r.outstanding.pop(res.number, None)
            self.write(payload)
        elif kind == "ready":
            r.window = payload + max(1, payload // 2)
        else:  # "error": it could not start
            if not any(x.window for x in self.live):
                raise RuntimeError(f"replica {r.index} failed to start:\n{payload}")
            logger.error("replica %d failed to start:\n%s", r.index, payload)
            self.restarts[r.index] = MAX_RESTARTS  # it would fail again

    def _lost(self, r: _Replica) -> None:
        """A replica died: its unfinished lines go to the others (or fail after MAX_ATTEMPTS);
        a new process takes its place unless it has had its restarts."""
        self.live.remove(r)
        r.proc.join(5)
        r.conn.close()
        index = r.index
        restart = self.restarts[index] < MAX_RESTARTS
        logger.warning(
            "replica %d died (exit code %s); its %d unfinished lines go to the others%s",
            index,
            r.proc.exitcode,
            len(r.outstanding),
            "; restarting it" if restart else "",
        )
        failed = []
        for number, line in sorted(r.outstanding.items()):
            self.attempts[number] = self.attempts.get(number, 0) + 1
            if self.attempts[number] < MAX_ATTEMPTS:
                self.retry.append(line)
                continue
            custom_id = parse_line(line)["custom_id"]  # the driver sends only lines that own one
            why = f"the replicas running this line died {MAX_ATTEMPTS} times"
            failed.append(error_result(custom_id, number, REPLICA_FAILED, why, 500))
        if failed:
            self.write(failed)
        if restart:
            self.restarts[index] += 1
            self.live.append(self._start(index))

    def stop(self) -> None:
        for r in self.live:
            if not r.window:  # still starting: nothing to finish
                r.proc.kill()
                continue
            try:
                r.conn.send(("end", None))
            except OSError:
                pass
        for r in self.live:
            r.proc.join(30)
            if r.proc.exitcode is None:
                r.proc.kill()
                r.proc.join(10)
            r.conn.close()
        self.live = []


def run_processes(
    lines: Iterator[InputLine],
    write: Put,
    model: str,
    served_model_names: Sequence[str],
    num_replicas: int,
    engine_args: dict[str, Any],
    on_ready: Callable[[], object] | None = None,
) -> None:
    """Run `lines` on `num_replicas` engine processes, `write`-ing each result as it comes;
    `on_ready` is called once every replica has started."""
    pool = _Pool(num_replicas, model, list(served_model_names), engine_args, write)
    try:
        pool.wait_ready()
        if on_ready is not None:
            on_ready()
        pool.dispatch(lines)
    finally:
        pool.stop()
