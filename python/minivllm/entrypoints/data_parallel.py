"""Data parallelism without Ray: one engine process per replica on this host.

The same replica code as over Ray (batch_runner.BatchRunner, one LLM per replica), with
processes and pipes for transport, for hosts where Ray is not installed (our GPU machines) and
for the benchmark. Replica i is a spawned process that sees GPUs [i * tp, (i + 1) * tp) of the
visible ones (CUDA_VISIBLE_DEVICES), or the CPU. Lines go to the replica with room (each holds
at most its engine's look-ahead plus a margin, so its running set stays full while the driver
refills it and memory stays bounded); results come back line by line as they finish.

Faults: a replica that dies (a killed process, a failed step) costs only its unfinished lines,
which go to the other replicas; a line that was running on `MAX_ATTEMPTS` replicas that died
gets an error line instead of a fourth try. When every replica is gone the run stops with what
it wrote (a rerun resumes).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
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

MAX_ATTEMPTS = 3
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


@dataclass(eq=False)
class _Replica:
    index: int
    proc: BaseProcess
    conn: Connection
    window: int = 0  # lines it may hold
    outstanding: dict[int, InputLine] = field(default_factory=dict)  # by line number
    is_alive: bool = True


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


def _start(
    index: int, devices: str | None, model: str, names: list[str], engine_args: dict[str, Any]
) -> _Replica:
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe(duplex=True)
    # Not a daemon: a daemonic process may not start tensor-parallel workers.
    proc = ctx.Process(
        target=_replica_main,
        args=(child, model, names, engine_args),
        name=f"minivllm-replica-{index}",
    )
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
    return _Replica(index, proc, conn)


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
    from minivllm.config import EngineConfig

    EngineConfig.create(model, **engine_args)  # a bad argument fails here, not N times
    devices = replica_devices(num_replicas, engine_args)
    names = list(served_model_names)
    replicas = [_start(i, devices[i], model, names, engine_args) for i in range(num_replicas)]
    try:
        _wait_ready(replicas)
        if on_ready is not None:
            on_ready()
        _dispatch(lines, write, replicas)
    finally:
        _stop(replicas)


def _wait_ready(replicas: list[_Replica]) -> None:
    waiting = {r.conn: r for r in replicas}
    while waiting:
        ready = wait(list(waiting), timeout=STARTUP_TIMEOUT_S)
        if not ready:
            raise RuntimeError(f"the replicas did not start in {STARTUP_TIMEOUT_S:.0f} s")
        for conn in ready:
            r = waiting.pop(conn)
            try:
                kind, payload = conn.recv()
            except EOFError:
                r.proc.join(5)
                raise RuntimeError(
                    f"replica {r.index} exited during start-up (code {r.proc.exitcode})"
                ) from None
            if kind == "error":
                raise RuntimeError(f"replica {r.index} failed to start:\n{payload}")
            r.window = payload + max(1, payload // 2)


def _dispatch(lines: Iterator[InputLine], write: Put, replicas: list[_Replica]) -> None:
    retry: deque[InputLine] = deque()
    attempts: dict[int, int] = {}
    is_exhausted = False
    while True:
        live = [r for r in replicas if r.is_alive]
        for r in live:
            chunk: list[InputLine] = []
            room = r.window - len(r.outstanding)
            while len(chunk) < room and retry:
                chunk.append(retry.popleft())
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
                    pass  # it died; wait() reports it below
        if is_exhausted and not retry and not any(r.outstanding for r in live):
            return
        if not live:
            raise RuntimeError(
                "every replica died; the results so far are written (a rerun resumes)"
            )
        ready = wait([r.conn for r in live] + [r.proc.sentinel for r in live])
        for r in live:
            if r.conn in ready:
                try:
                    while r.conn.poll(0):
                        _, results = r.conn.recv()
                        for res in results:
                            r.outstanding.pop(res.number, None)
                        write(results)
                    continue
                except (EOFError, OSError):
                    pass
            elif r.proc.sentinel not in ready:
                continue
            _lost(r, retry, attempts, write)


def _lost(r: _Replica, retry: deque[InputLine], attempts: dict[int, int], write: Put) -> None:
    """A replica died: its unfinished lines go to the others (or fail after MAX_ATTEMPTS)."""
    r.is_alive = False
    r.proc.join(5)
    logger.warning(
        "replica %d died (exit code %s); its %d unfinished lines go to the other replicas",
        r.index,
        r.proc.exitcode,
        len(r.outstanding),
    )
    failed = []
    for number, line in sorted(r.outstanding.items()):
        attempts[number] = attempts.get(number, 0) + 1
        if attempts[number] < MAX_ATTEMPTS:
            retry.append(line)
            continue
        custom_id = parse_line(line)["custom_id"]  # the driver sends only lines that own one
        why = f"the replicas running this line died {MAX_ATTEMPTS} times"
        failed.append(error_result(custom_id, number, REPLICA_FAILED, why, 500))
    r.outstanding.clear()
    if failed:
        write(failed)


def _stop(replicas: list[_Replica]) -> None:
    for r in replicas:
        if r.proc.is_alive():
            try:
                r.conn.send(("end", None))
            except OSError:
                pass
    for r in replicas:
        r.proc.join(30)
        if r.proc.exitcode is None:
            r.proc.kill()
            r.proc.join(10)
        r.conn.close()
