"""LLM: the offline engine users call (vLLM's API).

`generate` validates every prompt and SamplingParams first (a bad one raises before anything is
scheduled), hands the requests to the engine loop (engine/loop.py) and steps it until they have
all finished, feeding each step's token ids to the output processor (text, stop strings, the
outputs). The online server drives the same loop from a process of its own
(entrypoints/async_llm.py).

`stream` (and the `RequestStream` under it) is the same loop for callers that cannot hand over
every request at once: requests are added as others finish and each output comes back when its
request ends (run-batch, data-parallel replicas).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Any

from minivllm.config import EngineConfig
from minivllm.engine import RuntimeInfo, scheduler_class
from minivllm.engine.loop import EngineLoop
from minivllm.engine.output_processor import OutputProcessor
from minivllm.engine.requests import (
    InputProcessor,
    PromptType,
    Request,
    as_params_list,
    as_prompt_list,
)
from minivllm.outputs import RequestOutput
from minivllm.progress import Progress
from minivllm.request_stream import RequestStream
from minivllm.sampling_params import SamplingParams
from minivllm.tokenizer import find_eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

_END = object()  # the end of a `stream` input


class LLM:
    """An offline LLM engine for a local Hugging Face Qwen3 checkpoint folder.

    Engine arguments (see EngineConfig): dtype, device, max_model_len, max_num_seqs,
    max_num_batched_tokens, block_size, num_kv_blocks, gpu_memory_utilization,
    enable_prefix_caching, enforce_eager, tensor_parallel_size, scheduler, attention_backend,
    load_format, seed, tokenizer.

    With tensor_parallel_size > 1 the engine owns worker processes: `close()` ends them (also a
    context manager, on garbage collection, and at interpreter exit).
    """

    def __init__(self, model: str, **engine_args: Any):
        self.config = EngineConfig.create(model, **engine_args)
        scheduler_class(self.config.scheduler)  # fail before loading weights if it is missing
        self.tokenizer = load_tokenizer(self.config.tokenizer_path)
        self.loop = EngineLoop(self.config, find_eos_token_ids(self.config, self.tokenizer))
        self.inputs = InputProcessor(self.config, self.tokenizer)
        self._drive_lock = threading.Lock()  # one generate (or stream) drives the loop at a time
        self._stream_open = False
        self._next_request = 0
        logger.info(
            "minivllm ready: %s (%s, %s), %d KV blocks, scheduler=%s, eos ids %s",
            self.config.model,
            self.config.torch_dtype,
            self.loop.runner.device,
            self.runtime.num_kv_blocks,
            self.config.scheduler,
            list(self.runtime.eos_token_ids),
        )

    # ---- public API ----------------------------------------------------------------------

    @property
    def runtime(self) -> RuntimeInfo:
        return self.loop.runtime

    @property
    def model_runner(self) -> Any:
        return self.loop.runner

    @property
    def scheduler(self) -> Any:
        return self.loop.scheduler

    def close(self) -> None:
        """End the tensor-parallel workers; the engine cannot generate afterwards. Idempotent."""
        loop = self.__dict__.get("loop")
        if loop is not None:
            loop.close()

    def __enter__(self) -> LLM:  # noqa: PYI034 - py310 has no typing.Self
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - nothing useful to do during collection
            pass

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    @property
    def num_free_blocks(self) -> int:
        return int(self.scheduler.num_free_blocks)

    @property
    def stats(self) -> dict[str, int]:
        """Scheduler counters: num_preemptions, prefix_cache_queries, prefix_cache_hits."""
        return dict(self.scheduler.stats)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete each prompt (a string, a list of token ids, or a list of either).

        `sampling_params` is one SamplingParams for all prompts or one per prompt. Outputs come
        back in prompt order.
        """
        prompt_list = as_prompt_list(prompts)
        params_list = as_params_list(
            sampling_params, len(prompt_list), self.config.model_config.vocab_size
        )
        base = self._next_request
        requests = [
            self.inputs.request(str(base + i), p, sp, name=f"prompt {i}")
            for i, (p, sp) in enumerate(zip(prompt_list, params_list))
        ]
        self._next_request += len(requests)
        return self._run(requests, use_tqdm)

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        **chat_template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them, then
        generate. Each conversation is a list of {"role": ..., "content": ...} dicts."""
        if isinstance(messages, dict):
            raise ValueError(  # noqa: TRY004 - user input, as everywhere in the API
                "messages must be a list of message dicts (one conversation) or a list of such "
                f"lists, got one dict: {messages!r:.80}"
            )
        if not messages:
            raise ValueError("chat needs at least one message")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = [
            self.inputs.chat_prompt(
                conv, chat_template, add_generation_prompt, **chat_template_kwargs
            )
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def open_stream(self) -> RequestStream:
        """A `RequestStream` on this engine: requests added one at a time, each output returned
        when its request finishes. The engine is its own until it is closed."""
        return RequestStream(self)

    def stream(
        self,
        requests: Iterable[tuple[Hashable, PromptType, SamplingParams | None]],
        max_in_flight: int | None = None,
        use_tqdm: bool = False,
    ) -> Iterator[tuple[Hashable, RequestOutput | ValueError]]:
        """Run `(key, prompt, sampling_params)` items and yield `(key, output)` as each request
        finishes (in finishing order, not input order).

        The iterable is read lazily: an item is drawn only when fewer than `max_in_flight`
        requests (default: twice max_num_seqs, so the running set stays full) are unfinished,
        so an input of any length runs in bounded memory. A prompt that fails validation, or
        that the engine refuses, yields its ValueError in place of the output and the run goes
        on. Leaving the loop early aborts the requests still running.
        """
        limit = max_in_flight if max_in_flight is not None else 2 * self.config.max_num_seqs
        if limit < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {limit}")
        items = iter(requests)
        is_exhausted = False
        progress = Progress(None, enabled=use_tqdm)
        try:
            with self.open_stream() as rs:
                while True:
                    while not is_exhausted and rs.num_unfinished < limit:
                        item = next(items, _END)
                        if item is _END:
                            is_exhausted = True
                            break
                        key, prompt, params = item
                        try:
                            rs.add(key, rs.request(prompt, params, name=f"prompt {key!r}"))
                        except ValueError as e:
                            progress.step(0, 0, 1)
                            yield key, e
                    if not rs.num_unfinished:
                        if is_exhausted:
                            return
                        continue
                    step = rs.step()
                    progress.step(
                        step.num_prefill_tokens, step.num_output_tokens, len(step.finished)
                    )
                    yield from step.finished
        finally:
            progress.close()

    # ---- the step loop -------------------------------------------------------------------

    def _run(self, requests: list[Request], use_tqdm: bool) -> list[RequestOutput]:
        if not requests:
            return []
        if self._stream_open:
            raise RuntimeError("a RequestStream is open on this engine; close it first")
        with self._drive_lock:
            return self._drive(requests, use_tqdm)

    def _drive(self, requests: list[Request], use_tqdm: bool) -> list[RequestOutput]:
        loop = self.loop
        if loop.runner.is_closed:
            raise RuntimeError("this engine was closed")
        processor = OutputProcessor(self.tokenizer)
        num_left = len(requests)
        progress = None
        try:  # from the first add: an interrupt anywhere leaves no request behind
            for r in requests:
                for er in processor.add(r):
                    loop.add(er)
            progress = Progress(len(requests), enabled=use_tqdm)
            while num_left:
                out, done = processor.run_step(loop)
                num_left -= len(done.finished)
                progress.step(out.num_prefill_tokens, done.num_output_tokens, len(done.finished))
            # A stop string ends a request before the scheduler knows: its abort, and any step
            # still in flight (async scheduling), must go through before the next call.
            while loop.has_work():
                loop.step()
        except BaseException:
            # Leave the engine usable: drop every sequence and close the steps in flight.
            loop.recover()
            raise
        finally:
            if progress is not None:
                progress.close()
        return [processor.output(r.request_id) for r in requests]
