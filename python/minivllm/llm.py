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

import json
import logging
import threading
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
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
from minivllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_END = object()  # the end of a `stream` input

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str, *, warn: bool = True) -> Any:
    """The tokenizer in a folder (or a name in the local Hugging Face cache) through
    transformers, local files only; None if there is none, with a warning unless warn=False."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json's model type.
        if warn:
            logger.warning("no tokenizer files in %s; only token-id prompts will work", path)
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        if warn:
            logger.warning(
                "no usable tokenizer in %s (%s); only token-id prompts will work", path, e
            )
        return None


def find_eos_token_ids(config: EngineConfig, tokenizer: Any) -> tuple[int, ...]:
    """config.json's eos ids, generation_config.json's and the tokenizer's, within the vocab."""
    ids: list[int] = list(config.model_config.eos_token_ids)
    gen_file = Path(config.model) / "generation_config.json"
    if gen_file.is_file():
        try:
            eos = json.loads(gen_file.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError):
            eos = None
        ids.extend(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = config.model_config.vocab_size
    return tuple(sorted({int(i) for i in ids if isinstance(i, int) and 0 <= i < vocab}))


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
        for r in requests:
            for er in processor.add(r):
                loop.add(er)
        num_left = len(requests)
        progress = Progress(len(requests), enabled=use_tqdm)
        try:
            while num_left:
                out = loop.step()
                done = processor.process(out)
                for seq_id in done.to_abort:
                    loop.abort(seq_id)
                for er in done.to_add:
                    loop.add(er)
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
            progress.close()
        return [processor.output(r.request_id) for r in requests]


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
            params.validate()
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
            out = loop.step()
            done = processor.process(out)
            for seq_id in done.to_abort:
                loop.abort(seq_id)
            for er in done.to_add:
                loop.add(er)
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
