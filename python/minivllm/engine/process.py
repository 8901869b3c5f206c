"""The engine loop in a process of its own, for the online side.

The server's process spends its time on HTTP, JSON and text; the engine's loop must never wait
for it (nor share its interpreter lock), so `EngineProcess` runs `EngineLoop` in a spawned
process and talks to it over one pipe. Down the pipe go batches of sequences to add and ids to
abort; up come one message per step that produced anything (the loop's `StepOutput` and a few
counters for /metrics), the counters alone after a step that only changed them (an abort freed
blocks), and a "failed" message when a step raised: the loop then recovered (every sequence
aborted, the engine ready again) and the client fails those requests.

The process ends when the client sends "shutdown" or goes away (end of file on the pipe).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from minivllm.config import EngineConfig

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from minivllm.engine.loop import EngineLoop, EngineRequest

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0


def engine_stats(loop: EngineLoop) -> dict[str, int]:
    """The counters /metrics shows, read between steps."""
    s = loop.scheduler
    stats = dict(s.stats)
    stats["num_running"] = int(s.num_running)
    stats["num_waiting"] = int(s.num_waiting)
    stats["num_free_blocks"] = int(s.num_free_blocks)
    stats["num_kv_blocks"] = loop.runtime.num_kv_blocks
    return stats


class _Sender:
    """Sends the engine's messages from a thread of its own, all that piled up at once: a step
    never waits for the other side to read the pipe (which holds only so much). The thread runs
    while the loop waits for the GPU."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="minivllm-engine-sender")
        self._thread.daemon = True
        self._thread.start()

    def send(self, msg: tuple[Any, ...]) -> None:
        self._queue.put(msg)

    def _run(self) -> None:
        done = False
        while not done:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if None in batch:
                done = True
                batch = batch[: batch.index(None)]
            if not batch:
                continue
            try:
                self._conn.send(batch[0] if len(batch) == 1 else ("batch", batch))
            except OSError:  # the client went away: the main loop sees it on its next read
                return

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(30)


def _engine_main(config: EngineConfig, eos_token_ids: tuple[int, ...], conn: Connection) -> None:
    """The engine process: build the loop, then serve the pipe until shutdown."""
    from minivllm.engine.loop import EngineLoop

    try:
        loop = EngineLoop(config, eos_token_ids)
    except BaseException:  # noqa: BLE001 - start-up failures go up the pipe
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", loop.runtime))
    sender = _Sender(conn)
    last_stats: dict[str, int] | None = None
    try:
        while True:
            # Idle: block on the pipe. Busy: take what arrived, then step.
            if not loop.has_work() and not conn.poll(None):
                continue
            while conn.poll(0):
                msg = conn.recv()
                if msg[0] == "add":
                    for r in msg[1]:
                        loop.add(r)
                elif msg[0] == "abort":
                    for seq_id in msg[1]:
                        loop.abort(seq_id)
                elif msg[0] == "shutdown":
                    return
            if not loop.has_work():
                continue
            try:
                out = loop.step()
            except Exception as e:
                logger.exception("engine step failed; aborting every sequence")
                seq_ids = loop.recover()
                sender.send(("failed", seq_ids, f"{type(e).__name__}: {e}", engine_stats(loop)))
                continue
            stats = engine_stats(loop)
            if (
                len(out.token_ids)
                or out.finished
                or out.rejected
                or len(out.launched_prefill_seq_ids)
            ):
                sender.send(("step", out, stats))
            elif stats != last_stats:  # e.g. an abort freed blocks: /metrics must see it
                sender.send(("stats", stats))
            last_stats = stats
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        sender.close()
        loop.close()


class EngineProcess:
    """The client side: starts the engine process and passes messages both ways. `on_message`
    is called from a reader thread with each message the engine sends."""

    def __init__(
        self,
        config: EngineConfig,
        eos_token_ids: tuple[int, ...],
        on_message: Any,
    ):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        # Not a daemon: a daemonic process may not start the tensor-parallel workers.
        self.proc: BaseProcess = ctx.Process(
            target=_engine_main,
            args=(config, eos_token_ids, child),
            name="minivllm-engine",
        )
        self.proc.start()
        child.close()
        self._send_lock = threading.Lock()
        self.is_closed = False
        try:
            if not self._conn.poll(STARTUP_TIMEOUT_S):
                raise RuntimeError(f"the engine process did not start in {STARTUP_TIMEOUT_S} s")
            kind, payload = self._conn.recv()
        except EOFError:
            self.proc.join(5)
            raise RuntimeError(
                f"the engine process exited during start-up (code {self.proc.exitcode})"
            ) from None
        except BaseException:
            self.close()
            raise
        if kind == "error":
            self.proc.join(10)
            raise RuntimeError(f"the engine process failed to start:\n{payload}")
        self.runtime = payload
        self._on_message = on_message
        self._reader = threading.Thread(target=self._read, name="minivllm-engine-reader")
        self._reader.daemon = True
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                for m in msg[1] if msg[0] == "batch" else (msg,):
                    self._on_message(m)
        except (EOFError, OSError):
            if not self.is_closed:
                self._on_message(("dead", self.proc.exitcode))

    def send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def add(self, requests: list[EngineRequest]) -> None:
        if requests:
            self.send(("add", requests))

    def abort(self, seq_ids: list[int]) -> None:
        if seq_ids:
            self.send(("abort", seq_ids))

    def is_alive(self) -> bool:
        return self.proc.is_alive()

    def close(self, timeout_s: float = 30.0) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        try:
            self.send(("shutdown",))
        except OSError:
            pass
        self.proc.join(timeout_s)
        if self.proc.exitcode is None:
            self.proc.terminate()
            self.proc.join(10)
        self._conn.close()
