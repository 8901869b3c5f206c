"""RequestStream: one caller's requests on an LLM's engine loop, added as others finish.

`LLM.stream` (and run-batch, and the data-parallel replicas) use it where not every request can
be handed over at once: requests go in as the caller reads them, and each output comes back when
its request ends.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from minivllm.engine.output_processor import OutputProcessor
from minivllm.engine.requests import PromptType, Request
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from minivllm.llm import LLM


@dataclass
class StreamStep:
    """What one `RequestStream.step` finished, and the tokens it processed."""

    finished: list[tuple[Hashable, RequestOutput | ValueError]]
    num_prefill_tokens: int
    num_output_tokens: int


class RequestStream:
    """One caller's requests on an LLM's engine loop, added as it goes: `request` validates and
    tokenizes a prompt (ValueError naming it), `add` hands it in under a key of the caller's,
    `step` runs one engine step and returns the requests that finished, each with its output
    (or the ValueError of a request the engine refused).

    The stream holds the engine (a `generate` meanwhile raises) until `close`, which aborts
    whatever is unfinished and leaves the engine clean. A step that raises (an interrupt, a
    failed launch) recovers the engine, closes the stream and propagates.
    """

    def __init__(self, llm: LLM):
        if llm.loop.runner.is_closed:
            raise RuntimeError("this engine was closed")
        if not llm._drive_lock.acquire(blocking=False):
            raise RuntimeError("this engine is busy with another generate or stream")
        llm._stream_open = True
        self.llm = llm
        self.processor = OutputProcessor(llm.tokenizer)
        self._keys: dict[str, Hashable] = {}  # unfinished request id -> the caller's key
        self._next_id = 0
        self.is_closed = False

    @property
    def num_unfinished(self) -> int:
        return len(self._keys)

    def request(
        self, prompt: PromptType, params: SamplingParams | None = None, name: str = "prompt"
    ) -> Request:
        """One prompt validated and tokenized (nothing starts yet); ValueError names `name`."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            why = f"{name}: sampling params are {type(params).__name__}, not SamplingParams"
            raise ValueError(why)  # noqa: TRY004 - user input, as everywhere in the API
        try:
            params.verify(self.llm.config.model_config.vocab_size)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        request_id = str(self._next_id)
        self._next_id += 1
        return self.llm.inputs.request(request_id, prompt, params, name=name)

    def add(self, key: Hashable, request: Request) -> None:
        """Hand a request from `request` to the engine; its output comes back under `key`."""
        self._check_open()
        for er in self.processor.add(request):
            self.llm.loop.add(er)
        self._keys[request.request_id] = key

    def step(self) -> StreamStep:
        self._check_open()
        loop, processor = self.llm.loop, self.processor
        try:
            out, done = processor.run_step(loop)
        except BaseException:
            loop.recover()
            self._keys.clear()
            self.close()
            raise
        finished: list[tuple[Hashable, RequestOutput | ValueError]] = []
        for rid in done.finished:
            key = self._keys.pop(rid)
            error = processor.error(rid)
            output = processor.output(rid)
            finished.append((key, ValueError(error) if error is not None else output))
        return StreamStep(finished, out.num_prefill_tokens, done.num_output_tokens)

    def close(self) -> None:
        """Abort the unfinished requests and release the engine. Idempotent."""
        if self.is_closed:
            return
        self.is_closed = True
        loop = self.llm.loop
        try:
            for rid in list(self._keys):
                for seq_id in self.processor.abort(rid):
                    loop.abort(seq_id)
            self._keys.clear()
            # Aborts and stop-string ends, and any step in flight, go through before the next
            # caller (as at the end of generate).
            while loop.has_work() and not loop.runner.is_closed:
                loop.step()
        except BaseException:
            loop.recover()
            raise
        finally:
            self.llm._stream_open = False
            self.llm._drive_lock.release()

    def _check_open(self) -> None:
        if self.is_closed:
            raise RuntimeError("this RequestStream is closed")

    def __enter__(self) -> RequestStream:  # noqa: PYI034 - py310 has no typing.Self
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
