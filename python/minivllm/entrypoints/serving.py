"""The server's side of each request: validation before anything starts, the engine's outputs
as they come (the request aborted when the client goes away), and each request's metrics and
log line. The routes (api_server.py) stay thin around it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request as HTTPRequest

from minivllm.engine.requests import Request
from minivllm.entrypoints.async_llm import (
    AsyncLLM,
    EngineDeadError,
    EngineOverloadedError,
    RequestFailedError,
)
from minivllm.entrypoints.metrics import ServerMetrics
from minivllm.entrypoints.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    check_context_length,
    generation_config_defaults,
)
from minivllm.entrypoints.responses import error_body, token_decoder
from minivllm.outputs import RequestOutput

logger = logging.getLogger(__name__)
T = TypeVar("T")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type, param, code)


def request_error(
    e: ValueError, req: CompletionRequest | ChatCompletionRequest, param: str | None = None
) -> APIError:
    """A 400 for a request's bad value: `param` is the request field the message starts with
    (SamplingParams names its fields as the request does), else the given one."""
    first = re.match(r"\w*", str(e)).group()
    return APIError(400, str(e), param=first if first in type(req).model_fields else param)


def engine_error(e: Exception) -> APIError:
    if isinstance(e, EngineOverloadedError):
        return APIError(503, str(e), "server_error", code="engine_overloaded")
    return APIError(500, str(e), "server_error")


@dataclass
class _Tracker:
    """One engine request's bookkeeping: output tokens so far, the last output's time (for
    the inter-token latency), its log line and metrics when it ends."""

    request: Request
    metrics: ServerMetrics
    stream: bool
    output_lengths: dict[int, int] = field(default_factory=dict)
    last_time: float | None = None
    done: bool = False

    def update(self, out: RequestOutput) -> None:
        lengths = self.output_lengths
        for c in out.outputs:
            lengths[c.index] = lengths.get(c.index, 0) + len(c.token_ids)
        if self.stream:
            now = time.perf_counter()
            if self.last_time is not None:
                self.metrics.itl.observe(now - self.last_time)
            self.last_time = now
        if out.finished:
            self.finish(out)

    def finish(self, out: RequestOutput) -> None:
        self.done = True
        lengths = [self.output_lengths.get(c.index, 0) for c in out.outputs]
        self.metrics.observe_finished(out, lengths)
        m = out.metrics
        ttft = m.time_to_first_token if m is not None else None
        latency = m.latency if m is not None else None
        logger.info(
            "%s: %d prompt tokens, %s output tokens, finish %s, %.3f s (first token %.3f s)",
            self.request.request_id,
            len(self.request.prompt_token_ids),
            "+".join(map(str, lengths)),
            ",".join(str(c.finish_reason) for c in out.outputs),
            latency or 0.0,
            ttft or 0.0,
        )

    def close(self, why: str) -> None:
        """The request ended without its final output (client gone, engine error)."""
        if not self.done:
            self.done = True
            logger.info("%s: aborted (%s)", self.request.request_id, why)


class OpenAIServer:
    """The routes' state: the engine, the names it answers to, metrics."""

    def __init__(self, engine: AsyncLLM, served_model_names: Sequence[str]):
        self.engine = engine
        self.model_names = list(served_model_names)
        self.max_model_len = int(engine.config.max_model_len)
        self.metrics = ServerMetrics(lambda: engine.stats, engine.runtime.num_kv_blocks)
        self.sampling_defaults = generation_config_defaults(engine.config.model)
        if self.sampling_defaults:
            logger.info("sampling defaults from generation_config.json: %s", self.sampling_defaults)
        self.decode_token = token_decoder(engine.tokenizer)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="minivllm-requests")

    # ---- request intake -------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            served = ", ".join(map(repr, self.model_names))
            message = f"the model {name!r} does not exist; this server serves {served}"
            raise APIError(404, message, param="model", code="model_not_found")

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the server's one worker thread: tokenizing a long prompt or rendering a
        chat template must not stall every other client's stream. One thread, so the
        tokenizer and the engine's seed source are never used by two at once."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def make_requests(
        self,
        req: CompletionRequest | ChatCompletionRequest,
        prompts: Sequence[Any],
        params: Any,
        request_id: str,
        param: str,
    ) -> list[Request]:
        """Tokenize and check every prompt (`param`: where a bad one came from, numbered when
        there are several), then the queue for all of them; nothing is started yet."""

        def make() -> list[Request]:  # on the worker thread
            out = []
            one = len(prompts) == 1
            for i, prompt in enumerate(prompts):
                rid, name = (request_id, param) if one else (f"{request_id}-{i}", f"{param} {i}")
                r = self.engine.make_request(prompt, params, rid, name=name)
                check_context_length(req, len(r.prompt_token_ids), self.max_model_len)
                out.append(r)
            self.engine.check_capacity(len(out))
            return out

        try:
            return await self.off_loop(make)
        except ValueError as e:
            raise request_error(e, req, param) from None
        except (EngineOverloadedError, EngineDeadError) as e:
            raise engine_error(e) from None

    # ---- generation -----------------------------------------------------------------------

    async def final_outputs(
        self, http: HTTPRequest, requests: list[Request]
    ) -> list[RequestOutput] | None:
        """Each request's final output; None if the client went away first (the requests are
        then aborted)."""

        async def one(r: Request) -> RequestOutput:
            tracker = _Tracker(r, self.metrics, stream=False)
            try:
                async for out in self.engine.generate(r, stream=False):
                    tracker.update(out)
                    if out.finished:
                        return out
            except asyncio.CancelledError:
                tracker.close("cancelled: the client went away, or a sibling prompt failed")
                raise
            except BaseException as e:
                tracker.close(type(e).__name__)
                raise
            raise RequestFailedError(f"request {r.request_id} ended without an output")

        tasks = [asyncio.ensure_future(one(r)) for r in requests]
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            pending = set(tasks)
            while pending:
                done, _ = await asyncio.wait(pending | {gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    return None
                for t in done:
                    e = t.exception()
                    if isinstance(e, (EngineOverloadedError, EngineDeadError, RequestFailedError)):
                        raise engine_error(e) from None
                    if e is not None:
                        raise e
                pending -= done
            return [t.result() for t in tasks]
        finally:
            # Whatever is left (the client went away, a sibling failed) is cancelled: each
            # generate's clean-up aborts its request.
            for t in (*tasks, gone):
                t.cancel()
            await asyncio.gather(*tasks, gone, return_exceptions=True)

    async def outputs(self, requests: list[Request]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, delta) of every request as they come; ends when all have finished."""
        trackers = [_Tracker(r, self.metrics, stream=True) for r in requests]
        try:
            if len(requests) == 1:
                async for out in self.engine.generate(requests[0], stream=True):
                    trackers[0].update(out)
                    yield 0, out
                return
            async for i, out in _merged(self.engine, requests):
                trackers[i].update(out)
                yield i, out
        except (asyncio.CancelledError, GeneratorExit):
            for t in trackers:
                t.close("client disconnected")
            raise
        except BaseException as e:
            for t in trackers:
                t.close(type(e).__name__)
            raise


async def _disconnected(http: HTTPRequest) -> None:
    """Returns when the client has gone away (the body was read already)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


async def _merged(
    engine: AsyncLLM, requests: list[Request]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Several requests' streams as one, in arrival order."""
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()

    async def pump(i: int, r: Request) -> None:
        try:
            async for out in engine.generate(r, stream=True):
                queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
    try:
        left = len(requests)
        while left:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            left -= item.finished
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
