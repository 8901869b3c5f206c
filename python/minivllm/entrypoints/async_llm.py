"""AsyncLLM: the engine for asyncio code (the server, `minivllm chat`).

    engine = AsyncLLM("path/to/model", max_model_len=4096)
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), "req-1"):
        print(out.outputs[0].text, end="")       # the text added since the last output
    await engine.abort("req-1")                   # e.g. when the client went away

The engine loop runs in a process of its own (engine/process.py); this side validates and
tokenizes requests (engine/requests.py), and turns each step's token ids into per-request outputs
(engine/output_processor.py): with `stream=True` every output carries what is new since the last
one (token ids, text that is whole characters and cannot still become a stop string), the last has
`finished=True`; with `stream=False` one output comes, the final one. A consumer that stops
iterating (a client that disconnected) aborts its request, so its KV blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from minivllm.config import EngineConfig
from minivllm.engine.output_processor import OutputProcessor
from minivllm.engine.process import EngineProcess
from minivllm.engine.requests import InputProcessor, PromptType, Request
from minivllm.outputs import CompletionOutput, RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.tokenizer import find_eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """More requests are waiting than the engine was told to queue."""


class EngineDeadError(RuntimeError):
    """The engine process is gone; requests cannot be served."""


class RequestFailedError(RuntimeError):
    """The engine aborted the request (a step failed); the engine itself is still serving."""


class AsyncLLM:
    """The engine process, the request and output processing, one queue per live request.

    `max_waiting_requests`: how many requests may wait beyond max_num_seqs running ones before
    `generate` raises EngineOverloadedError (None: no limit).
    """

    def __init__(self, model: str, max_waiting_requests: int | None = None, **engine_args: Any):
        self.config = EngineConfig.create(model, **engine_args)
        self.tokenizer = load_tokenizer(self.config.tokenizer_path)
        self.inputs = InputProcessor(self.config, self.tokenizer)
        self.processor = OutputProcessor(self.tokenizer)
        self.max_waiting_requests = max_waiting_requests
        self.stats: dict[str, int] = {}  # the engine's counters after its last step
        self._streams: dict[str, tuple[asyncio.Queue[Any], bool]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._inbox_lock = threading.Lock()
        self._dispatch_scheduled = False
        self._ids = itertools.count()
        self.dead: str | None = None
        eos = find_eos_token_ids(self.config, self.tokenizer)
        self.engine = EngineProcess(self.config, eos, self._on_message)
        self.runtime = self.engine.runtime

    # ---- requests --------------------------------------------------------------------------

    def make_request(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        name: str = "prompt",
    ) -> Request:
        """Validate and tokenize (ValueError naming the problem, the prompt as `name`) without
        starting anything: what a server does before it opens a stream (then
        `check_capacity`)."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params is {type(params).__name__}, not SamplingParams")
        params.verify(self.config.model_config.vocab_size)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._streams or request_id in self.processor:
            raise ValueError(f"request id {request_id!r} is already in use")
        return self.inputs.request(request_id, prompt, params, name=name)

    def chat_prompt(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        """A conversation through the chat template: a prompt dict for `make_request`."""
        return self.inputs.chat_prompt(messages, **kwargs)

    async def generate(
        self,
        prompt: PromptType | Request,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        stream: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them (see the module docstring). A
        Request from `make_request` was checked against the queue by its maker (a server checks
        all of a call's prompts at once, before it opens a stream): only a dead engine refuses
        it here."""
        request = prompt if isinstance(prompt, Request) else None
        if request is None:
            request = self.make_request(prompt, sampling_params, request_id)
            self.check_capacity()
        elif self.dead is not None:
            raise EngineDeadError(self.dead)
        self._bind_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        rid = request.request_id
        self._streams[rid] = (queue, stream)
        finished = False
        try:
            self.engine.add(self.processor.add(request, stream=stream))
            while not finished:
                item = await queue.get()
                while not queue.empty() and not isinstance(item, BaseException):
                    nxt = queue.get_nowait()  # a slow consumer gets what piled up at once
                    item = nxt if isinstance(nxt, BaseException) else _merge(item, nxt)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._abort(rid)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends without a final output."""
        entry = self._streams.pop(request_id, None)
        self._abort(request_id)
        if entry is not None:
            entry[0].put_nowait(asyncio.CancelledError(f"request {request_id} was aborted"))

    def _abort(self, request_id: str) -> None:
        seq_ids = self.processor.abort(request_id)
        if seq_ids and not self.engine.is_closed:
            try:
                self.engine.abort(seq_ids)
            except OSError:  # the engine is gone; nothing holds its blocks any more
                pass

    def check_capacity(self, incoming: int = 1) -> None:
        """EngineOverloadedError when `incoming` more requests would overfill the waiting queue
        (EngineDeadError when the engine is gone; ValueError when they would overfill even an
        idle engine): what a server checks before it opens a stream."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        limit = self.max_waiting_requests
        if limit is None:
            return
        room = self.config.max_num_seqs + limit
        if incoming > room:
            raise ValueError(
                f"{incoming} prompts in one request, more than the engine takes at once "
                f"(max_num_seqs={self.config.max_num_seqs} running + {limit} waiting)"
            )
        if len(self._streams) + incoming > room:
            raise EngineOverloadedError(
                f"{len(self._streams)} requests are in the engine (max_num_seqs="
                f"{self.config.max_num_seqs} running + {limit} waiting); try again later"
            )

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    # ---- messages from the engine process ------------------------------------------------

    def _bind_loop(self) -> None:
        """Dispatch on the running event loop. A new loop (asyncio.run again) also takes what
        reached the inbox after the old one stopped, whose dispatch it would never run."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        with self._inbox_lock:
            self._loop = loop
            self._dispatch_scheduled = True
        loop.call_soon(self._dispatch)

    def _on_message(self, msg: tuple[Any, ...]) -> None:
        """The reader thread: queue the message; one dispatch on the event loop takes all."""
        with self._inbox_lock:
            self._inbox.append(msg)
            if self._dispatch_scheduled or self._loop is None:
                return
            self._dispatch_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._dispatch)
        except RuntimeError:  # the event loop closed: nobody is waiting
            pass

    def _dispatch(self) -> None:
        """Everything the engine sent since the last dispatch: each stream gets one output
        covering all of it (a server that fell behind catches up in fewer, larger chunks)."""
        with self._inbox_lock:
            msgs = list(self._inbox)
            self._inbox.clear()
            self._dispatch_scheduled = False
        updated: dict[str, None] = {}
        for msg in msgs:
            kind = msg[0]
            if kind == "step":
                self.stats = msg[2]
                self._handle_step(msg[1], updated)
            elif kind == "stats":
                self.stats = msg[1]
            elif kind == "failed":
                self.stats = msg[3]
                self._fail(msg[1], RequestFailedError(f"the engine aborted the request: {msg[2]}"))
            elif kind == "dead":
                self.dead = f"the engine process exited (code {msg[1]})"
                for rid in list(self._streams):
                    self._put(rid, EngineDeadError(self.dead))
        for rid in updated:
            if rid in self.processor:
                self._put(rid, self.processor.delta(rid))

    def _handle_step(self, out: Any, updated: dict[str, None]) -> None:
        res = self.processor.process(out)
        self.engine.abort(res.to_abort)
        self.engine.add(res.to_add)
        updated.update(dict.fromkeys(res.updated))
        for rid in res.finished:
            updated.pop(rid, None)
            error = self.processor.error(rid)
            entry = self._streams.get(rid)
            if error is not None:
                self.processor.output(rid)  # forgets the request
                self._put(rid, RequestFailedError(error))
            elif entry is not None and entry[1]:
                self._put(rid, self.processor.delta(rid, pop=True))  # the last delta
            else:
                self._put(rid, self.processor.output(rid))

    def _fail(self, seq_ids: list[int], error: BaseException) -> None:
        for rid in {self.processor.request_id_of(s) for s in seq_ids} - {None}:
            self.processor.abort(rid)
            self._put(rid, error)

    def _put(self, request_id: str, item: Any) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            entry[0].put_nowait(item)

    def shutdown(self) -> None:
        self.engine.close()

    def __enter__(self) -> AsyncLLM:  # noqa: PYI034 - py310 has no typing.Self
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive deltas of one request as one."""
    outputs = {c.index: c for c in a.outputs}
    for c in b.outputs:
        prev = outputs.get(c.index)
        if prev is None:
            outputs[c.index] = c
            continue
        logprobs = None
        if prev.logprobs is not None or c.logprobs is not None:
            logprobs = (prev.logprobs or []) + (c.logprobs or [])
        outputs[c.index] = CompletionOutput(
            index=c.index,
            text=prev.text + c.text,
            token_ids=prev.token_ids + c.token_ids,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
            logprobs=logprobs,
        )
    prompt_logprobs = a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs
    return replace(
        b,
        outputs=[outputs[i] for i in sorted(outputs)],
        prompt_logprobs=prompt_logprobs,
    )
